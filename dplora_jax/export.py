"""From a training workdir to files other tools load: a PEFT adapter or a merged HF model."""

from __future__ import annotations

import os


from dplora_jax import build, checkpoint as ckpt_lib, config as config_lib, lora as lora_lib
from dplora_jax import peft
from dplora_jax.dp.ledger import Ledger
from dplora_jax.federated import centre as centre_lib, round as round_lib


def load_trained(workdir: str):
  """Rebuilds the base model of a workdir's run with the LoRA of its newest checkpoint.

  Returns:
    (model with the trained LoRA attached, RunConfig, checkpoint meta, tokenizer, model path).

  Raises:
    CheckpointError: no checkpoint, a damaged one, or a base model whose checksum changed.
  """
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    latest = ckpt.latest()
    if latest is None:
      raise ckpt_lib.CheckpointError(f"{workdir!r} holds no checkpoint (expected "
                                     f"{ckpt.directory}/<round>); train with checkpoint_every > 0.")
    meta = ckpt.read_meta(latest)
    cfg = config_lib.from_config_dict(meta["config"])
    model, tok, fingerprint, path = build.load_base(cfg)
    ckpt_lib.check_resumable(meta, cfg, fingerprint, os.path.join(ckpt.directory, str(latest)))
    build.attach_lora(model, cfg, tok)
    graphdef, lora, frozen = lora_lib.split(model)
    server_tx = round_lib.server_optimizer(cfg.fed)
    target = ckpt_lib.state_tree(round_lib.init_state(lora, server_tx))
    tree = ckpt.restore_state(latest, target)
    model = lora_lib.merge(graphdef, tree["lora"], frozen)
    if cfg.lora.centre != "none":
      values = centre_lib.load(workdir, cfg)
      if values is None:
        raise ckpt_lib.CheckpointError(f"{workdir!r}: a centred LoRA run without its "
                                       f"{centre_lib.CENTRE_FILE}; the adapter needs it.")
      lora_lib.set_centre(model, values)
  finally:
    ckpt.close()
  return model, cfg, meta, tok, path


def privacy_readme(cfg, meta: dict) -> str:
  """The adapter's README: what it is and the privacy it was trained under."""
  ledger = Ledger.from_dict(meta["ledger"])
  lines = ["# dplora_jax LoRA adapter", "",
           f"Trained with dplora_jax: dp.mode = `{cfg.dp.mode}`, fed.aggregation = "
           f"`{cfg.fed.aggregation}`, {ledger.rounds} of {cfg.fed.rounds} rounds, "
           f"{cfg.fed.num_clients} clients, LoRA r = {cfg.lora.rank} on "
           f"{list(cfg.lora.targets) or 'the family default targets'}.",
           f"Base model: `{meta['model']['path']}` (checksum {meta['model']['fingerprint']}).",
           "", "## Privacy", ""]
  if not ledger.entries:
    lines.append("No differential privacy (dp.mode = 'none'): the training data has no "
                 "guarantee.")
  for e in ledger.entries:
    lines.append(f"- {e.name}-level: eps = {e.epsilon:.4f}, delta = {e.delta:.3g}; unit: "
                 f"{e.unit}; {len(e.segments)} segment(s) composed with dp-accounting "
                 f"({e.accountant}): " + "; ".join(
                     f"{g.releases} releases at q = {g.sampling_rate:.4g}, sigma = "
                     f"{g.noise_multiplier:.4f} ({g.source})" for g in e.segments) + ".")
  lines += ["", "The ledger travels in `adapter_model.safetensors` metadata (and "
            "`dplora_privacy.json`): a dplora_jax run started from this adapter with "
            "`lora.init_from` composes it into its own guarantee.",
            "", "Load with `peft.PeftModel.from_pretrained(base_model, this_directory)`.", ""]
  return "\n".join(lines)


def export_workdir(workdir: str, out: str, *, merged: bool = False) -> str:
  """Writes the newest checkpoint of `workdir` as a PEFT adapter (or a merged HF model) to `out`."""
  model, cfg, meta, tok, path = load_trained(workdir)
  if merged:
    if cfg.model.random_init:
      raise ValueError("a merged export needs a real base model; this run used model.random_init.")
    from dplora_jax.models import load_model
    loaded = load_model(path, with_tokenizer=False)
    peft.export_merged(model, loaded.config, tok, out, source_path=path)
    with open(os.path.join(out, "README.md"), "w") as f:
      f.write(privacy_readme(cfg, meta).replace("LoRA adapter", "merged model (base + LoRA)"))
    peft.write_ledger(out, meta["ledger"])
    return out
  return peft.export_adapter(model, build.effective_lora(cfg), out, base_model=path,
                             readme=privacy_readme(cfg, meta), ledger=meta["ledger"])
