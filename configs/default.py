"""Base config: every field with a one-line comment. Experiment configs override a few.

Run:  python launch.py --config configs/default.py --workdir /tmp/default
Produces: the sprites job at its base settings (same as configs/sprites.py without its tuning).
"""

import ml_collections


def recipe(c: ml_collections.ConfigDict, name: str) -> None:
  """Applies a diffusion recipe in place: "" (keep), "edm" (Karras et al. 2022: the edm process
  and preconditioning, Heun on 18 karras steps = 35 network evaluations, EDM2's post-hoc EMA
  tracked) or "fm" (rectified
  flow: the linear path's velocity, logit-normal t as in SD3, Euler on 50 karras steps)."""
  if name == "edm":
    c.diffusion.update(process="edm", prediction="edm", weighting="simple")
    c.sample.update(sampler="heun", num_steps=18, spacing="karras", clip_x0="none")
    c.train.posthoc_ema = (0.05, 0.10)  # EDM2's post-hoc EMA profiles (--mode posthoc)
  elif name == "fm":
    c.diffusion.update(
      process="flow", prediction="flow", weighting="simple", t_distribution="logit_normal"
    )
    c.sample.update(sampler="euler", num_steps=50, spacing="karras", clip_x0="none")
  elif name:
    raise ValueError(f"unknown recipe {name!r}; use '', 'edm' or 'fm'.")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the base config. `arg` is unused here; variants pass it (`configs/x.py:arg`)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # base PRNG seed: parameters, data order, noise and sampling keys derive from it

  c.data = d = ml_collections.ConfigDict()
  d.source = "sprites"  # folder | tfds | npz | sprites | shards (streamed from disk)
  d.path = ""  # folder, .npz, or shard folder from diffusion.data.prepare (folder/npz/shards)
  d.name = ""  # tfds dataset name, e.g. "cifar10" (source tfds)
  d.data_dir = ""  # tfds data_dir ("" = tfds default)
  d.split = "train"  # training split (tfds) ; for other sources the non-held-out part
  d.eval_split = ""  # held-out split (tfds); "" = hold out `eval_fraction` of the data
  d.eval_fraction = 0.02  # fraction held out for evaluation when there is no test split
  d.image_key = ""  # tfds feature with the image ("" = detect)
  d.label_key = ""  # tfds feature with the label ("" = detect, "none" = unlabelled)
  d.image_size = 16  # square side length the images are resized and centre-cropped to
  d.channels = 3  # 1 (grayscale) or 3 (RGB); inputs are converted to this
  d.resize = "antialias"  # antialias | nearest (pixel art)
  d.background = (255, 255, 255)  # RGB that transparent pixels are composited onto
  d.labels = True  # folder: class labels from the first level of subfolders
  d.num_sprites = 50_000  # sprites: how many to generate
  d.random_flip = True  # random horizontal flip in the pipeline
  d.prefetch = 2  # batches prepared ahead (a background thread; shards: reader threads)
  d.cache_dir = ""  # decoded images ("": folder <path>/.diffusion_cache, tfds ~/.cache/diffusion)
  d.download = True  # tfds: download and prepare (array_record) if not prepared (needs internet)
  d.sprite_seed = 0  # sprites: generator seed (fixed data across config.seed sweeps)

  c.diffusion = f = ml_collections.ConfigDict()
  # vp: the discrete schedule below (DDPM family); ve | edm | flow | cosine: continuous time, see
  # diffusion/processes.py (their networks see c_noise = ln(sigma / alpha) / 4)
  f.process = "vp"
  f.schedule = "cosine"  # linear | scaled_linear | cosine | sigmoid | logsnr_cosine_shifted | ...
  f.num_timesteps = 1000  # T: discrete steps of the forward process
  f.schedule_params = ml_collections.ConfigDict()  # extra kwargs for schedules.make (e.g. tau)
  f.prediction = "eps"  # eps | x0 | v | flow (flow process) | edm (preconditioned): net output
  f.weighting = "simple"  # simple | min_snr | trunc_snr: per-example loss weight
  f.min_snr_gamma = 5.0  # gamma of min-SNR-gamma weighting
  f.variance = "fixed_small"  # fixed_small | fixed_large | learned_range (2C outputs)
  f.vlb_weight = 0.001  # lambda of the hybrid loss L_simple + lambda L_vlb (learned_range)
  f.continuous_time = False  # sample continuous t in [0, 1], condition the net on log-SNR
  f.t_sampling = "uniform"  # uniform | antithetic | stratified
  f.sigma_data = 0.5  # edm preconditioning: the data's standard deviation
  f.sigma_min = 0.002  # ve/edm: smallest sigma; continuous processes: default sampling range
  f.sigma_max = 80.0  # ve/edm: largest sigma; continuous processes: default sampling range
  f.rho = 7.0  # edm: sigma(t) = (sigma_max^(1/rho) + (1-t)(sigma_min^(1/rho) - ...))^rho
  f.p_mean = -1.2  # edm training: ln sigma ~ N(p_mean, p_std^2)
  f.p_std = 1.2
  f.t_distribution = "uniform"  # flow training: uniform | logit_normal t (SD3)
  f.logit_mean = 0.0  # flow logit-normal t = sigmoid(logit_mean + logit_std n)
  f.logit_std = 1.0
  # denoising | meanflow (few-step MeanFlow on the flow process with prediction flow, sampled by
  # config.sample.sampler=meanflow) | consistency (set by --mode distill); docs/few_step.md
  f.objective = "denoising"
  f.meanflow_ratio = 0.25  # MeanFlow: fraction of examples with r < t (the rest r = t)
  f.meanflow_norm_p = 1.0  # MeanFlow adaptive weight 1 / (||delta||^2 + c)^p
  f.meanflow_norm_c = 1e-3
  f.meanflow_guidance = 1.0  # MeanFlow: guidance scale folded into the target (1 = none)
  f.meanflow_time_scale = 1.0  # MeanFlow: the network sees (scale t, scale (t - r))

  c.model = m = ml_collections.ConfigDict()
  m.arch = "unet"  # unet | dit (diffusion/nets/; docs/nets.md)
  m.init_from = ""  # .safetensors parameters to start from (python -m diffusion.nets.convert)
  # U-Net fields (arch unet):
  m.base_channels = 64  # channels at the first level
  m.channel_mult = (1, 2, 2)  # channel multiplier per level (levels = len)
  m.num_res_blocks = 2  # residual blocks per level
  m.attn_resolutions = (8,)  # feature-map sizes with self-attention
  m.num_heads = 4  # attention heads (ignored when head_dim > 0)
  m.head_dim = -1  # channels per head; > 0 overrides num_heads
  m.dropout = 0.0  # dropout rate inside residual blocks
  m.resblock_updown = False  # BigGAN-style up/down-sampling inside residual blocks
  m.num_groups = 32  # GroupNorm groups (min(num_groups, channels))
  m.num_classes = 0  # > 0: class-conditional with an extra null class for guidance
  # compute dtype: float32 | bfloat16 (params, optimiser and EMA stay float32). bfloat16 halves
  # activation memory and uses the tensor cores of GPUs/TPUs; little gain on CPUs.
  m.dtype = "float32"
  m.film = True  # FiLM conditioning h = norm(h)*(1+scale)+shift; False = DDPM additive h + emb
  m.attention_impl = ""  # "" = cudnn flash kernel on GPU in bfloat16, else XLA | xla | cudnn
  m.remat = False  # recompute blocks and attention in the backward pass: less memory, ~1.2x FLOPs
  # DiT fields (arch dit; num_heads, num_classes, dtype, attention_impl, remat as above):
  m.preset = ""  # DiT-S/2 ... DiT-XL/8: sets depth, hidden_size, num_heads, patch_size
  m.patch_size = 2  # side of the square patches (tokens = (image_size / patch_size)^2)
  m.hidden_size = 384  # token width D
  m.depth = 12  # transformer blocks
  m.mlp_ratio = 4.0  # MLP hidden width / D
  m.qk_norm = False  # RMSNorm (learned scale) on each head's queries and keys
  m.norm = "layernorm"  # layernorm | rmsnorm in the adaLN-Zero blocks
  m.mlp = "gelu"  # gelu (tanh) | swiglu (hidden 2/3 mlp_ratio D)
  m.pos_embed = "sincos"  # sincos (fixed 2D, added) | rope (2D axial rotary on q, k)
  m.time_freq_shift = 0.0  # time frequencies exp(-ln(1e4) i / (128 - shift)): 0 DiT, 1 diffusers
  m.second_time = False  # a second time input t2 embedded like t (two-time objectives)

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 64  # global batch, split over all devices of all processes
  t.num_steps = 10_000  # optimiser steps
  t.learning_rate = 2e-4  # peak learning rate
  t.warmup_steps = 500  # linear warm-up steps
  t.lr_schedule = "constant"  # constant | cosine (decay to 0 after warm-up)
  t.weight_decay = 0.0  # AdamW decoupled weight decay
  t.grad_clip = 1.0  # global-norm clipping (0 = off)
  t.b1 = 0.9  # Adam beta1
  t.b2 = 0.999  # Adam beta2
  t.ema_decay = 0.9999  # EMA decay of the parameters
  t.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step))
  # post-hoc EMA (EDM2): sigma_rels of the power-function EMAs tracked (EDM2: (0.05, 0.10); () =
  # off), their snapshots saved every posthoc_every steps (0 = at checkpoints) in <workdir>/phema
  t.posthoc_ema = ()
  t.posthoc_every = 0
  t.label_dropout = 0.1  # classifier-free guidance: drop labels to the null class
  # Speed/memory trade-offs:
  # steps_per_call: steps per compiled call (unrolled): less dispatch, longer compile, k batches
  # in memory. grad_accum: micro-batches per step in a lax.scan: activations / k, same maths,
  # slow on CPU (XLA:CPU runs backward passes in loops slowly).
  t.steps_per_call = 1  # optimiser steps per compiled call
  t.grad_accum = 1  # micro-batches per optimiser step
  t.log_every = 100  # steps between progress lines / metrics.jsonl rows (and, with several
  # processes, between checks for a stop signal: all must stop at the same step)
  t.checkpoint_every = 1000  # steps between checkpoints
  t.keep_checkpoints = 3  # newest checkpoints kept
  t.keep_every = 0  # also keep every M-th step permanently (0 = off)
  t.sample_every = 2000  # steps between sample grids (0 = only at the end)
  t.distributed = "auto"  # auto | on | off: jax.distributed.initialize()
  t.coordinator_address = ""  # explicit multi-host: host:port of process 0
  t.num_processes = 0  # explicit multi-host: process count (0 = from environment)
  t.process_id = -1  # explicit multi-host: this process (-1 = from environment)

  c.parallel = par = ml_collections.ConfigDict()
  # FSDP: the mesh is (data, fsdp) = (devices / fsdp, fsdp); the batch is split over both, and
  # parameters, Adam moments, EMA and post-hoc EMAs over fsdp (each device keeps ~1/fsdp; see
  # docs/sharding.md). 1 = plain data parallel; -1 = all local devices (HSDP: sharded within a
  # host, data parallel across hosts); must divide the device count. The numbers trained do not
  # depend on it (nor on the device count), up to float rounding.
  par.fsdp = 1
  par.fsdp_min_size = 4096  # arrays with fewer elements stay replicated

  c.sample = s = ml_collections.ConfigDict()
  # ddim | ddpm | euler | heun | edm | dpm_solver++ (diffusion/solvers.py), any grid; 1-4 steps on
  # their own grids: meanflow (a meanflow model) | consistency (a distilled model)
  s.sampler = "ddim"
  s.num_steps = 50  # steps of the sampler (network evaluations: heun/edm ~2 per step)
  # every sampler on any grid: integer timesteps of the vp schedule (uniform | leading |
  # trailing | quadratic | logsnr) or, for every process, a sigma grid: karras (rho) | log
  s.spacing = "uniform"
  s.eta = 0.0  # DDIM eta (0 = deterministic, 1 = DDPM's posterior variance)
  s.num_images = 64  # images per grid / sample run
  s.batch_size = 64  # images per compiled sampling call
  s.guidance_scale = 1.0  # classifier-free guidance (1 = off)
  s.clip_x0 = "clip"  # none | clip (to [-1, 1]) | dynamic (thresholding) of predicted x0
  s.checkpoint = -1  # step to sample from (-1 = newest)
  s.use_ema = True  # sample with EMA parameters
  s.ema = ""  # "" = the classic EMA (use_ema); "posthoc:0.07" = --mode posthoc's reconstruction
  s.tag = ""  # samples/<tag>/ ("" = derived from the settings)
  s.seed = 0  # sampling seed (--mode sample): batch b uses fold_in(PRNGKey(seed), b)
  s.labels = ""  # conditional models: "" = cycle all classes; "3" or "1,4" = cycle these labels
  s.gif_images = 16  # images in samples/<tag>/reverse.gif (0 = no GIF)
  s.save_latents = False  # latent runs: also the latents in samples.npz (`latents`)
  s.rho = 7.0  # karras sigma grid exponent (EDM eq. 5)
  s.sigma_min = 0.0  # sigma grids: smallest / largest sigma (0 = the process's range)
  s.sigma_max = 0.0
  s.s_churn = 0.0  # edm sampler (EDM Algorithm 2): churn, its sigma range and noise scale
  s.s_tmin = 0.0
  s.s_tmax = 1e9
  s.s_noise = 1.0
  s.guidance_interval = (0.0, 1e9)  # sigma grids: guidance only for sigma in [lo, hi]

  # --mode distill: consistency distillation of a trained workdir (docs/few_step.md)
  c.distill = dd = ml_collections.ConfigDict()
  dd.teacher = ""  # the teacher's --workdir (same data shape and model config)
  dd.num_scales = 18  # N Karras noise levels between the process's sigma_min and sigma_max
  dd.solver = "heun"  # the teacher's step between adjacent levels: heun | dpm_solver++ | euler
  dd.target_ema = 0.95  # EMA decay of the target network (sampling uses train.ema_decay's EMA)

  c.eval = e = ml_collections.ConfigDict()
  # heldout: bits/dim and a size-matched comparison with held-out images (quick, this codebase
  # only) | fid50k: the papers' protocol, num_samples samples against the whole training set
  e.protocol = "heldout"
  e.samplers = "ddim:10,ddim:50,dpm_solver++:20"  # comma list of sampler:steps to score
  e.num_images = 1000  # generated images per sampler (and held-out images for the floor)
  e.reference_images = 5000  # training images the samples and held-out images are compared to
  e.batch_size = 250  # images per compiled call when sampling and computing features
  e.bpd_images = 256  # held-out images for bits/dim (0 = skip bits/dim)
  e.bpd_batch_size = 64  # images per compiled bits/dim call
  # estimate: the unbiased stratified estimate of the bound and its standard error (bpd_strata + 1
  # network evaluations per image) | exact: the full T-step bound (T evaluations per image)
  e.bpd_method = "estimate"
  e.bpd_strata = 32  # estimate: ranges of t, one draw each (capped at num_timesteps - 1)
  e.checkpoint = -1  # step to evaluate (-1 = newest)
  e.seed = 0  # eval randomness: samples, bits/dim noise, subsets and projections
  e.inception_weights = (
    ""  # .npz of pt_inception-2015-12-05 (pytorch-fid), never a pickle; "" = no FID
  )
  # a latent run's real images: where the pixels its latents were encoded from lie now (folder,
  # .npz or pixel shard folder); "" = the latent manifest's record
  e.pixel_data = ""
  e.feature_steps = 500  # training steps of the feature net (cached in eval/feature_net.npz)
  e.num_samples = 50_000  # fid50k: samples per sampler (papers: 50,000)
  e.reference = ""  # fid50k: .npz of Inception mu, sigma (guided-diffusion/EDM); "" = training set
  e.reference_dir = ""  # fid50k: reference statistics cache ("" = ~/.cache/diffusion/fid_reference)
  e.kid_pr_samples = 10_000  # fid50k: samples (and training images) for KID and precision/recall
  e.is_splits = 10  # fid50k: Inception Score splits (mean and std over them)
  e.chunk_images = 5_000  # fid50k: images between saved states (an interrupted eval resumes)
  e.watch = False  # score each new checkpoint of the workdir as training writes it
  e.poll_seconds = 60.0  # watch: seconds between looks for new checkpoints
  e.watch_timeout = 21_600.0  # watch: stop after this long without a new checkpoint (0 = never)
  return c
