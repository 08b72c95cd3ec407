"""Generate text with any loaded model (and optionally a LoRA adapter).

  python -m launch.generate --model smollm2-135m-instruct \
      --prompt "What is the capital of France?" --max-new-tokens 20
"""

import argparse

from dplora_jax import peft
from dplora_jax.generate import generate
from dplora_jax.models import load_model
from dplora_jax.models.tokenizer import encode
from launch import cli


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="smollm2-135m-instruct",
                 help="HF model directory, .gguf file, or alias (default %(default)s)")
  p.add_argument("--prompt", required=True, help="the user message (or raw text)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
  p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--lora", default="", help="a PEFT LoRA adapter directory to apply")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  loaded = load_model(args.model, dtype=args.dtype)
  tok = loaded.tokenizer
  if args.lora:
    peft.load_adapter(loaded.model, args.lora)
  if tok.chat_template and not args.no_chat_template:
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True)
  else:
    text = args.prompt
  [out] = generate(loaded.model, [encode(tok, text)], max_new_tokens=args.max_new_tokens,
                   eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                   temperature=args.temperature, seed=args.seed)
  print(tok.decode(out, skip_special_tokens=True))
  return 0


if __name__ == "__main__":
  cli.run(main)
