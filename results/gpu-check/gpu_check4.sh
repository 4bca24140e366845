# Session 2026-12-04 (second part): the CUDA tests again (the fork-guard test's new version had not run on a GPU),
# then adapter_mixup on CUDA with spawned attack workers in its dev attacks (gate, beta grid, v2) and --resume.
W=$PWD/.whl; L=$OUT; mkdir -p $L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl > /dev/null 2>&1
export PYTHONPATH=$W/stubs:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NLTK_DATA=$W/nltk_data TA_CACHE_DIR=/tmp/ta TOKENIZERS_PARALLELISM=false
cd $W/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_evaluation.py -k "workers or forks or cuda or gpu" > $L/tests.log 2>&1 &
Q=(--cuda --task toy --model tiny --max-seq-length 64 --max-train-examples 1500 --max-eval-examples 300
   --eval-batch-size 64 --lr 3e-3 --attacks deepwordbug,pruthi --attack-examples 20 --output-dir /tmp/q)
timeout 100 python3 finetune.py "${Q[@]}" --epochs 3 --exp-name finetune > $L/finetune.log 2>&1; echo "finetune rc $?"
ft=$(ls -d /tmp/q/toy__finetune__*/model | tail -n 1)
A=("${Q[@]}" --model $ft --epochs 2 --adv-epochs 2 --train-attacks deepwordbug --gate-examples 20 --beta dev
   --beta-attack-examples 10 --dynamic-rule softmax --v2-grid 1:0,1:1 --adv-train-examples 60 --beta-grid-step 0.5
   --exp-name adapter_mixup)
timeout 200 python3 adapter_mixup.py "${A[@]}" --attack-workers 2 > $L/adapter_mixup.log 2>&1; echo "adapter_mixup rc $?"
run=$(ls -d /tmp/q/toy__adapter_mixup__* | tail -n 1); ls $run | grep -c "^dev_"
timeout 150 python3 adapter_mixup.py "${A[@]}" --attack-workers 1 --resume $run > $L/adapter_mixup_resume.log 2>&1
echo "resume rc $?"; grep -c "resuming\|same weights" $L/adapter_mixup_resume.log
python3 - $run <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))["extra"]
print("rows", [(x["key"], x["clean_accuracy"], {a: m.get("aua") for a, m in x["attacks"].items()}) for x in r["rows"]])
print("gate", {k: (v["aua_clean"], v["aua_adversarial"]) for k, v in r.get("gate", {}).items()} if isinstance(r.get("gate"), dict) else r.get("gate"))
PY
grep -E "device|\[gate|\[stage 4\]|\[stage 5\]|Error" $L/adapter_mixup.log | head -12
wait; echo "total $(( $(date +%s) - T0 )) s"; tail -n 3 $L/tests.log
