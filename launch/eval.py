"""Evaluate a base model, a training workdir or a PEFT adapter on one or more tasks.

  python -m launch.eval --model smollm2-135m-instruct --task tfns
  python -m launch.eval --workdir runs/demo --out runs/demo/eval.json
  python -m launch.eval --model smollm2-135m-instruct --adapter runs/demo/adapter \\
      --task finance_sentiment --file my_tweets.jsonl --out eval.json
  python -m launch.eval --model smollm2-135m-instruct --task boolq --task piqa --task winogrande

--task repeats (each with the next --file, or its default held-out data); a workdir's own task,
held-out file and data settings are the default, so its numbers equal the training loop's
"after" numbers. The table goes to stdout; --out writes JSON: the metrics at the top level for
one task, {"results": [...]} for several.
"""

import argparse
import json
import sys

from dplora_jax import checkpoint, evaluation, report, tasks
from launch import cli


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="", help="HF directory, .gguf or alias (not with --workdir)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--adapter", default="", help="a PEFT LoRA adapter directory")
  g.add_argument("--workdir", default="", help="a launch.train workdir (its newest checkpoint)")
  p.add_argument("--task", action="append", default=[], help=f"one of {tasks.names()}")
  p.add_argument("--file", action="append", default=[],
                 help="data file for the task at the same position (PATH or PATH::test)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--examples", type=int, default=None, help="a fixed subset of N rows (0 = all)")
  p.add_argument("--max-length", type=int, default=None, help="tokens per row")
  p.add_argument("--max-answer-tokens", type=int, default=None, help="choice / qa answers")
  p.add_argument("--max-new-tokens", type=int, default=None, help="qa: generated tokens")
  p.add_argument("--batch-size", type=int, default=None, help="rows per batch")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  return p.parse_args(argv)


def main(argv=None) -> int:
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about read-only checkpoints
  args = parse(sys.argv[1:] if argv is None else argv)
  names = args.task
  for n in names:
    tasks.get(n)  # an unknown name fails before any model loads
  if len(args.file) > max(len(names), 1):
    raise ValueError(f"{len(args.file)} --file for {len(names)} --task; give one --task per "
                     "--file.")
  ev = evaluation.load(args.model, args.adapter, args.workdir)
  if not names:
    if ev.run is None:
      raise ValueError("--task is required with --model (e.g. --task tfns).")
    names = [ev.run.data.task]
  files = args.file + [""] * (len(names) - len(args.file))
  over = dict(eval_examples=args.examples, max_length=args.max_length,
              max_answer_tokens=args.max_answer_tokens, max_new_tokens=args.max_new_tokens,
              eval_batch_size=args.batch_size)
  results = [evaluation.evaluate(ev, n, f, **over) for n, f in zip(names, files)]
  for r in results:
    print(f"{r['task']:<18} n={r['n']:<5} {report.metric_text(r)}  ({r['file']})")
    if report.label_f1_text(r):
      print(f"{'':<18} F1 of each label: {report.label_f1_text(r)}")
  if args.out:
    doc = ({**ev.source, **results[0]} if len(results) == 1 else
           {**ev.source, "results": results})
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  cli.run(main, [checkpoint.CheckpointError])
