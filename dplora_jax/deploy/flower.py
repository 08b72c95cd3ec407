"""Flower as transport and orchestration: the ServerApp and ClientApp of a deployment.

Flower carries the messages of `deploy.protocol` (LoRA as a float32 `ArrayRecord`, the rest as a
`ConfigRecord`) and runs the apps; the privacy is ours: `deploy.server.serve` samples clients,
aggregates and noises, `deploy.client.InstitutionClient` trains with per-example DP-SGD, its own
randomness and its own ledger. Flower's DP wrappers and strategies are not used (they draw noise
from numpy's global RNG, have no accountant, weight by example counts and sample a fixed
fraction).

Run config of the ServerApp (`flwr run launch/flower <federation> --run-config '...'`):
  config            the experiment file, as for launch.train (`configs/deploy.py[:k=v,...]`)
  overrides         space-separated `a.b=v` config overrides ("" for none)
  workdir           the server's owner-only working directory (resumes from its checkpoints)
  round-timeout     seconds to wait for the sampled clients' replies
  wait-for-clients  seconds to wait at start for all clients to join
  evaluate          evaluate the global LoRA on the public held-out set before and after
Node config of a ClientApp (`flower-supernode --node-config '...'`): see
`deploy.client.NodeSettings`.
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dplora_jax.deploy import protocol

KINDS = {protocol.HELLO: MessageType.QUERY, protocol.TRAIN: MessageType.TRAIN}


def to_record(message: dict) -> RecordDict:
  """A protocol message as Flower records (arrays: float32 ArrayRecord; config: ConfigRecord)."""
  arrays = ArrayRecord({n: Array(np.ascontiguousarray(a, np.float32))
                        for n, a in message["arrays"].items()})
  return RecordDict({"arrays": arrays, "config": ConfigRecord(dict(message["config"]))})


def from_record(content: RecordDict) -> dict:
  """The inverse of `to_record`.

  Raises:
    protocol.ProtocolError: records other than "arrays" and "config".
  """
  if set(content.keys()) != {"arrays", "config"}:
    raise protocol.ProtocolError(f"records {sorted(content.keys())}; expected arrays, config.")
  arrays = {n: a.numpy() for n, a in content["arrays"].items()}
  return {"arrays": arrays, "config": dict(content["config"])}


class FlowerTransport:
  """`deploy.server.Transport` over a Flower `Grid`."""

  def __init__(self, grid: Grid, log=print):
    self.grid, self.log = grid, log

  def node_ids(self) -> list[int]:
    return sorted(int(n) for n in self.grid.get_node_ids())

  def send(self, kind: str, messages: dict[int, dict], timeout: float) -> dict[int, dict | None]:
    out = {int(n): None for n in messages}
    msgs = [Message(to_record(m), dst_node_id=int(n), message_type=KINDS[kind],
                    ttl=max(float(timeout), 60.0)) for n, m in messages.items()]
    replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
    # pushing gave each message its id; an error reply may come from the SuperLink itself
    # (e.g. "node unavailable"), so the node is the one the replied-to message went to
    sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs}
    for rep in replies:
      node = sent_to.get(rep.metadata.reply_to_message_id, int(rep.metadata.src_node_id))
      if rep.has_error():
        self.log(f"node {node}: no reply ({rep.error.reason})")
        continue
      try:
        out[node] = from_record(rep.content)
      except protocol.ProtocolError as e:
        self.log(f"node {node}: unreadable reply ({e})")
    return out


# -- ServerApp -------------------------------------------------------------------------------

server_app = ServerApp()


def _log(msg: str):
  print(f"[dplora server] {msg}", flush=True)


def server_settings(run_config: dict):
  """(RunConfig, ServerSettings) from the ServerApp's run config.

  Raises:
    ValueError: a missing or bad key, or a bad config file or override (named).
  """
  from dplora_jax import config_files
  from dplora_jax.deploy.server import ServerSettings
  spec = str(run_config.get("config", "") or "")
  workdir = str(run_config.get("workdir", "") or "")
  if not spec or not workdir:
    raise ValueError("run config needs 'config' (an experiment file) and 'workdir'.")
  overrides = {}
  for item in shlex.split(str(run_config.get("overrides", "") or "")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"run config overrides: {item!r} is not a.b=value.")
    overrides[key.removeprefix("--config.")] = value
  cfg = config_files.load_with_overrides(spec, overrides)
  settings = ServerSettings(os.path.abspath(workdir),
                            round_timeout=float(run_config.get("round-timeout", 600)),
                            wait_for_clients=float(run_config.get("wait-for-clients", 120)),
                            evaluate=_flag(run_config.get("evaluate", True), "evaluate"))
  return cfg, settings


def _flag(value, key: str) -> bool:
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("true", "false"):
    return str(value).lower() == "true"
  raise ValueError(f"run config {key}={value!r}; expected true or false.")


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
  from dplora_jax import report
  from dplora_jax.deploy.server import serve
  try:
    cfg, settings = server_settings(dict(context.run_config))
    _log(f"coordinator on {os.uname().nodename} (pid {os.getpid()}), workdir {settings.workdir}")
    result = serve(cfg, FlowerTransport(grid, _log), settings, _log)
  except Exception as e:  # the run's one line; the traceback behind DPLORA_DEBUG
    _log(f"error: {type(e).__name__}: {e}")
    if os.environ.get("DPLORA_DEBUG"):
      traceback.print_exc()
    raise
  print(report.format_summary(result.summary), flush=True)
  _log(f"summary: {os.path.join(settings.workdir, 'summary.json')}; adapter: "
       f"{result.summary.get('adapter')}")


# -- ClientApp -------------------------------------------------------------------------------

client_app = ClientApp()


def _client_reply(kind: str, msg: Message, context: Context) -> Message:
  from dplora_jax.deploy.client import InstitutionClient, NodeSettings
  node = NodeSettings.from_node_config(dict(context.node_config))
  client = InstitutionClient(node)
  client.use_compilation_cache()
  reply = client.handle(kind, from_record(msg.content))
  c = reply["config"]
  print(f"[dplora client {node.client_id}] {kind} round {c.get('round', '-')}: {c['status']}"
        f"{' (' + c['reason'] + ')' if c['reason'] else ''} on {os.uname().nodename} "
        f"(pid {os.getpid()})", file=sys.stderr, flush=True)
  return Message(to_record(reply), reply_to=msg)


@client_app.query()
def _hello(msg: Message, context: Context) -> Message:
  return _client_reply(protocol.HELLO, msg, context)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
  return _client_reply(protocol.TRAIN, msg, context)
