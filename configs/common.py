"""The full config tree with defaults; experiment files override what they change."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random stream (init, noise, samplers)
  c.log_every = 1  # write metrics.jsonl every this many rounds
  c.checkpoint_every = 1  # orbax checkpoint every this many rounds (0 = never; last round always)
  c.checkpoint_keep = 3  # keep the newest K checkpoints

  c.model = ml_collections.ConfigDict()
  c.model.path = "smollm2-135m-instruct"  # HF directory, .gguf file, or alias
  c.model.random_init = False  # True: a random tiny Llama (tests) with the dims below
  c.model.tokenizer = ""  # tokenizer path/alias for random_init ("" = model.path)
  c.model.hidden_size = 32  # random_init only
  c.model.num_layers = 2  # random_init only
  c.model.num_heads = 4  # random_init only
  c.model.num_kv_heads = 2  # random_init only
  c.model.intermediate_size = 64  # random_init only
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"  # storage dtype of the frozen weights

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8  # r
  c.lora.alpha = 16.0  # scaling = alpha / r
  c.lora.targets = ("q", "k", "v")  # adapted projections (the paper: q, k, v)
  c.lora.use_rslora = False  # scaling = alpha / sqrt(r)
  c.lora.init = "kaiming"  # kaiming (PEFT: A kaiming-uniform, B 0), gaussian, zero_a (A 0, B random)
  c.lora.freeze_a = False  # FFA-LoRA: A fixed, B trained
  c.lora.init_from = ""  # start from a PEFT adapter directory ("" = random init)

  c.data = ml_collections.ConfigDict()
  c.data.train_file = "tfns/train.jsonl"  # jsonl/json/csv with text, label (packaged or a path)
  c.data.eval_file = "tfns/validation.jsonl"  # held-out file, same fields
  c.data.labels = ("negative", "positive", "neutral")  # label id -> answer word (TFNS order)
  c.data.prompt = ("Instruction: What is the sentiment of this tweet? Please choose an answer "
                   "from {negative/neutral/positive}.\nInput: {text}\nAnswer:")  # FinGPT
  c.data.max_length = 80  # tokens per example (the text is truncated, never the answer)
  c.data.max_train_examples = 0  # 0 = all
  c.data.eval_examples = 200  # fixed subset of the eval file (0 = all)
  c.data.batch_size = 8  # expected per-client batch per local step
  c.data.sampling = "poisson"  # poisson (required by DP) or shuffle (non-private baselines)

  c.dp = ml_collections.ConfigDict()
  # sample: per-example DP-SGD in each client (unit: one example); client: DP-FedAvg (unit: one
  # client); sample+client: both guarantees; paper: the paper's Algorithm 1; none: no privacy
  c.dp.mode = "sample"
  c.dp.clip_norm = 1.0  # C, per-example L2 bound over the whole LoRA tree
  c.dp.noise_multiplier = 0.0  # sigma; 0 = calibrate from target_epsilon
  c.dp.target_epsilon = 8.0  # end-to-end eps for every client's examples
  c.dp.delta = 1e-5  # end-to-end delta (must be < 1/smallest client)
  c.dp.accountant = "rdp"  # rdp or pld (dp-accounting)
  c.dp.allow_large_delta = False  # permit delta >= 1/n
  c.dp.max_batch_size = 0  # physical Poisson batch cap (0 = automatic, see dp/sampling.py)
  c.dp.truncation_delta_fraction = 0.01  # share of delta for over-full Poisson samples
  c.dp.client_clip_norm = 0.1  # S: client-level L2 bound on each client's LoRA update (initial S)
  c.dp.client_noise_multiplier = 0.0  # server noise sigma (std sigma * S); 0 = calibrate
  c.dp.client_target_epsilon = 8.0  # end-to-end eps for a whole client
  c.dp.client_delta = 1e-3  # client-level delta (must be < 1/num_clients)
  c.dp.adaptive_clip_quantile = 0.0  # adaptive S: target unclipped fraction gamma (0 = fixed S)
  c.dp.adaptive_clip_lr = 0.2  # adaptive S: geometric step eta
  c.dp.adaptive_clip_count_noise = 0.0  # adaptive S: std of the count noise (0 = expected/20)
  c.dp.paper_noise = "sigma_c"  # paper mode noise std: sigma_c (sigma*C) or sigma_c_over_b
  c.dp.noise_seed = -1  # -1: the noise key comes from OS entropy; >= 0: reproducible noise

  c.fed = ml_collections.ConfigDict()
  c.fed.num_clients = 5  # K
  c.fed.rounds = 10  # T
  c.fed.local_steps = 1  # DP-SGD steps per client per round
  c.fed.partition = "iid"  # iid, dirichlet or field
  c.fed.dirichlet_alpha = 1.0  # label skew for dirichlet
  c.fed.partition_field = ""  # record field naming the client, for partition=field
  c.fed.client_rate = 1.0  # Poisson client sampling rate (1 = all clients, the paper)
  c.fed.aggregation = "fedavg"  # fedavg: A and B averaged separately (the paper); ffa: A frozen
  c.fed.weighting = "examples"  # client weights: examples (FedAvg) or uniform (client-level DP)
  c.fed.server_optimizer = "fedavg"  # fedavg (lr 1 = averaging) or fedadam
  c.fed.server_lr = 1.0  # server learning rate

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "sgd"  # client optimizer: sgd (the paper) or adamw
  c.optim.learning_rate = 0.5  # client learning rate
  c.optim.weight_decay = 0.0  # adamw only
  c.optim.microbatch_size = 8  # per-example gradients computed this many at a time
  return c


def apply_args(c: ml_collections.ConfigDict, arg: str | None, names: dict) -> None:
  """Applies `k=v,k=v` from `--config file.py:k=v,...` using short names -> dotted fields."""
  if not arg:
    return
  for item in arg.split(","):
    key, _, value = item.partition("=")
    if key not in names:
      raise ValueError(f"unknown config arg {key!r}; expected one of {sorted(names)}.")
    *path, field = names[key].split(".")
    node = c
    for part in path:
      node = node[part]
    old = node[field]
    node[field] = type(old)(value) if not isinstance(old, bool) else value in ("1", "true",
                                                                               "True")
