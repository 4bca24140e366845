#!/bin/bash
# GPU checks on one CUDA GPU: the CUDA tests, every method end to end on CUDA with bf16 (tiny BERT, toy task, real
# TextAttack recipes), then alone on the GPU: a bert-base-sized step (fp32 vs bf16, plain and FreeLB K=5) with
# peak memory, the method benches at bert-base size, and 1 vs 4 spawned attack workers.
# Run from the folder that holds a clean copy of the repo (src/) beside the wheels; logs to $OUT.
W=$PWD/.whl; SRC=$W/src; L=$OUT; mkdir -p $L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
  > $L/pip.log 2>&1 || { tail $L/pip.log; exit 1; }
export PYTHONPATH=$W/stubs:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NLTK_DATA=$W/nltk_data TA_CACHE_DIR=/tmp/ta TOKENIZERS_PARALLELISM=false
cd $SRC
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, textattack, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1
W=$W python3 - <<'PY'
import glob, os, shutil, torch
from transformers import BertConfig, BertForSequenceClassification
torch.manual_seed(0)
BertForSequenceClassification(BertConfig(num_labels=2)).save_pretrained("/tmp/bertbase")
for f in glob.glob(os.environ["W"] + "/bertbase/*"):
    shutil.copy(f, "/tmp/bertbase")
print("bert-base (random init, MiniLM's uncased vocab) saved")
PY
T0=$(date +%s)
Q=(--cuda --bf16 --task toy --model tiny --max-seq-length 64 --max-train-examples 1500 --max-eval-examples 300
   --eval-batch-size 64 --lr 3e-3 --attacks deepwordbug,pwws --attack-examples 20 --output-dir /tmp/q)
echo "== phase A (concurrent, correctness): CUDA tests + each method end to end on CUDA, bf16"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_evaluation.py -k "cuda or gpu or workers" > $L/tests.log 2>&1 &
( timeout 100 python3 finetune.py "${Q[@]}" --epochs 3 --attack-workers 2 --exp-name finetune > $L/finetune.log 2>&1
  echo "finetune rc $?" >> $L/rc.txt
  ft=$(ls -d /tmp/q/toy__finetune__*/model | tail -n 1)
  timeout 100 python3 adapter_mixup.py "${Q[@]}" --model $ft --epochs 2 --adv-epochs 2 --train-attacks deepwordbug \
    --gate-examples 40 --beta-attack-examples 10 --dynamic-rule softmax --v2-grid 1:0,1:1 --adv-train-examples 60 \
    --beta-grid-step 0.25 --baseline full-at --full-epochs 1 --exp-name adapter_mixup > $L/adapter_mixup.log 2>&1
  echo "adapter_mixup rc $?" >> $L/rc.txt ) &
( timeout 150 python3 robust_ticket.py "${Q[@]}" --epochs 3 --search-epochs 2 --retrain-epochs 3 --adv-steps 2 \
    --sparsity 0.3,0.7 --exp-name robust_ticket > $L/robust_ticket.log 2>&1; echo "robust_ticket rc $?" >> $L/rc.txt ) &
( timeout 150 python3 early_bird_adv.py "${Q[@]}" --search-lr 3e-3 --check-every 0.1 --window 2 --epochs 3 \
    --adv-steps 2 --adv-lr 0.01 --adv-init-mag 0.02 --with-baselines --exp-name early_bird_adv > $L/early_bird_adv.log 2>&1
  echo "early_bird_adv rc $?" >> $L/rc.txt ) &
( timeout 150 python3 rosearch.py "${Q[@]}" --hidden 16 --max-cells 3 --population 4 --tournament 2 --cycles 4 \
    --proxy-epochs 1 --final-epochs 2 --top-k 1 --fitness-attack pgd --probe-examples 100 --probe-pgd-radius 0.05 \
    --extra-rows handmade,accuracy-only --exp-name rosearch > $L/rosearch.log 2>&1; echo "rosearch rc $?" >> $L/rc.txt ) &
wait
echo "phase A: $(( $(date +%s) - T0 )) s"; cat $L/rc.txt; tail -n 3 $L/tests.log
for f in finetune robust_ticket early_bird_adv rosearch adapter_mixup; do
  echo "-- $f"; grep -E "device|clean test accuracy|Aua|aua|Error|error" $L/$f.log | grep -v Warning | tail -n 6; done
echo "== phase B (alone on the GPU): bert-base step time and peak memory, SST-2 (4,000 sentences, 1 epoch, batch 32)"
B=(--cuda --task sst2 --data-dir $W/sst2 --model /tmp/bertbase --max-train-examples 4000 --dev-size 500
   --max-eval-examples 500 --max-seq-length 128 --epochs 1 --attacks none --output-dir /tmp/b)
for prec in fp32 bf16; do for k in 0 5; do
  flag=(); [ $prec = bf16 ] && flag=(--bf16)
  timeout 90 python3 - "${B[@]}" "${flag[@]}" --adv-steps $k --exp-name ${prec}_k$k <<'PY' 2>&1 | grep -E "^\[gpu\]|Error" | tail -n 3
import json, glob, runpy, sys, time, torch
sys.argv = ["finetune.py"] + sys.argv[1:]
t = time.time()
runpy.run_path("finetune.py", run_name="__main__")
name = sys.argv[sys.argv.index("--exp-name") + 1]
r = json.load(open(sorted(glob.glob(f"/tmp/b/*{name}*/results.json"))[-1]))
w = r.get("wall_clock", {})
print(f"[gpu] {name}: clean {r['clean_accuracy']:.1f} train {w.get('train', float('nan')):.1f} s (1 epoch), "
      f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, process {time.time() - t:.1f} s")
PY
done; done
echo "== method benches at bert-base size (fp32, alone)"
timeout 90 python3 robust_ticket.py --bench "${B[@]}" --adv-steps 5 --bench-steps 10 --bench-seq-length 128 --exp-name rt_bench 2>&1 | grep -iE "bench|ratio|x$|Error" | tail -n 8
timeout 120 python3 early_bird_adv.py --bench "${B[@]}" --adv-steps 5 --bench-steps 10 --exp-name eb_bench 2>&1 | grep -E "\[bench\]|Error" | tail -n 20
timeout 60 python3 adapter_mixup.py --bench "${B[@]}" --bench-steps 10 --exp-name am_bench 2>&1 | grep -iE "bench|step|Error" | tail -n 8
echo "== attack workers on CUDA: 1 vs 4 spawned (MiniLM-free: a bert-base fine-tuned 1 epoch above would be random; tiny toy model)"
ft=$(ls -d /tmp/q/toy__finetune__*/model | tail -n 1)
timeout 120 python3 bench.py --cuda --finetuned $ft --task toy --max-seq-length 64 --attacks deepwordbug,pwws \
  --attack-examples 100 --compare-workers 4 --output-dir /tmp/w 2>&1 | grep -vE "Warning|warn|^\s*$|it/s|s/it" | tail -n 6
echo "total $(( $(date +%s) - T0 )) s"
