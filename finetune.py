# Dense baselines of the comparison: plain fine-tuning, and FreeLB adversarial training (Zhu et al., ICLR 2020,
# arXiv 1909.11764) with --adv-steps > 0 — README.md section "Baselines".
import argparse
import time

from attacks import evaluate_model
from common import (add_adversary_args, add_common_args, adversary_from_args, finetune, finish_run, load_model,
                    load_task, make_loader, results_template, start_run, tokenize, usage_errors, validate_common_args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune a BERT-family classifier (plain, or FreeLB with "
                                     "--adv-steps > 0), then evaluate it under the shared attack protocol.")
    add_common_args(parser, "finetune")
    add_adversary_args(parser, steps=0, lr=0.03, init_mag=0.05)  # TextDefender's FreeLB values, off by default
    parser.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                        help="save the fine-tuned model (save_pretrained) in the run folder")
    return parser.parse_args(argv)


def main(args):
    validate_common_args(args)
    adversary = adversary_from_args(args)
    method = "freelb" if adversary.steps > 0 else "finetune"
    run = start_run(args, method)
    data = load_task(args)
    model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length, run.dir + "/tiny")
    train_loader = make_loader(tokenize(data, data.train, tokenizer, args.max_seq_length), tokenizer,
                               args.batch_size, shuffle=True, seed=args.seed)
    dev_loader = make_loader(tokenize(data, data.dev, tokenizer, args.max_seq_length), tokenizer,
                             args.eval_batch_size, shuffle=False)
    print(f"[{method}] train {len(data.train)}  dev {len(data.dev)}  test {len(data.test)}", flush=True)
    fit = finetune(model, train_loader, dev_loader, run, args.epochs, args.lr, args.weight_decay, args.warmup,
                   adversary=adversary, tag=method)
    results = results_template(args, method, "FreeLB" if adversary.steps > 0 else "fine-tune", model)
    results["wall_clock"]["train"] = fit["seconds"]
    results["dev_accuracy"] = 100.0 * fit["dev_accuracy"]
    if args.save_model:
        model.save_pretrained(f"{run.dir}/model")
        tokenizer.save_pretrained(f"{run.dir}/model")
    start = time.time()
    evaluate_model(model, tokenizer, data, args, run, results)
    results["wall_clock"]["evaluate"] = time.time() - start
    finish_run(run, results)
    return results


if __name__ == "__main__":
    with usage_errors():
        main(parse_args())
