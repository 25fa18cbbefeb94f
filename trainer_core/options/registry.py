"""Every training option, declared once: its name, type, default, range or choices, which families read it,
where it is set (a widget of which Train nodes, or a ``training_args`` key), the kohya key that sets it, the ``ss_*``
metadata key that records it, whether a resume may change it, and its help text.

Derived from here: the Train nodes' widgets (nodes/train_inputs.py), the ``training_args`` parser
(training_args.py), the kohya config mapping (kohya/config.py), the plain metadata keys (kohya/metadata.py), the
settings a resume may change (loop.py) and docs/training-args.md. Adding an option is one declaration here plus its
maths. Widgets are listed per node in LAYOUTS: ComfyUI stores widget values by position, so a layout only ever grows
at its end.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..families.flow import PREDICTION_TYPES, WEIGHTING_SCHEMES
from ..families.flux import TIMESTEP_SAMPLING
from ..maths.losses import HUBER_SCHEDULES, LOSS_TYPES
from ..maths.optim import OPTIMIZERS, SCHEDULERS
from ..kohya.sample_prompts import SAMPLERS

ANY = "any"  # Train LoRA (any model): a model without a preset, DDPM (eps/v) or flow, as ComfyUI samples it
FAMILIES = ("sd1", "sdxl", "sd3", "flux", ANY)
DDPM = ("sd1", "sdxl", ANY)  # noise and loss options kohya applies to the DDPM families only (any: eps/v models)
FLOW = ("sd3", "flux", ANY)  # rectified flow (families/flow.py) (any: flow models)
NODE_KINDS = ("sd1", "sdxl", "sd3", "flux", "dreambooth", ANY)  # Train nodes: four LoRA families, DreamBooth
#                                                                  (SD1/SD2), the generic one
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Option:
    name: str                     # Kiln's name: the widget's input id or the training_args key (kohya's where it has one)
    kind: str                     # int, float, bool, choice, str, text (multiline), steps (int, or a float < 1 = ratio),
    #                               kwargs (kohya's [k=v ...] arguments)
    default: object
    help: str = ""
    low: float | None = None      # inclusive bounds
    high: float | None = None
    step: float | None = None     # the widget's step
    choices: tuple = ()
    families: tuple = FAMILIES    # the families that read it (a training_args key elsewhere is refused)
    widget: bool = False          # a node input (LAYOUTS says which nodes, in which position); else training_args
    optional: bool = False        # an optional widget (listed after the required ones by the frontend)
    kohya: tuple = ()             # the kohya config keys that set it, same meaning
    metadata: tuple = ()          # the ss_* keys (without "ss_") that record its value as given
    resumable: bool = False       # a resume may change it; it takes effect from the resumed step
    config: bool = True           # a TrainConfig field of this name holds its value
    group: str = ""               # the TrainConfig group that holds it (cfg.noise.noise_offset); "" = top level
    extra: dict = field(default_factory=dict, hash=False, compare=False)     # widget-only settings
    variants: dict = field(default_factory=dict, hash=False, compare=False)  # node kind -> fields that differ there

    def for_node(self, kind: str) -> "Option":
        """This option as node ``kind`` shows it (e.g. DreamBooth's smaller learning rate)."""
        return replace(self, **self.variants[kind]) if kind in self.variants else self


def _w(name, kind, default, help="", **kw) -> Option:
    """A widget option."""
    return Option(name, kind, default, help, widget=True, **kw)


def _ta(name, kind, default, help, low=None, high=None, **kw) -> Option:
    """A training_args option; its key is kohya's (or, beyond kohya, Kiln's), read from kohya configs as is."""
    kw.setdefault("kohya", (name,))
    return Option(name, kind, default, help, low, high, **kw)


def _te_lr(name: str, what: str, **variants) -> Option:
    return _w(name, "float", 0.0, f"Learning rate of the {what} LoRA; 0 = {what} not trained. (kohya differs: there "
                                  f"an unset text-encoder LR trains at learning_rate, and network_train_unet_only "
                                  f"switches the encoders off; cli --config follows kohya.)",
              low=0.0, high=10.0, step=1e-6, optional=True, config=False, variants=variants)


DREAMBOOTH_SAVES = {
    "save_every_n_steps": "Also write the full checkpoint every N steps (the last step too, as kohya), as "
                          "<save_name>-stepNNNNNNNN.safetensors in models/checkpoints. 0 = off.",
    "save_name": "Name (inside models/checkpoints) of the intermediate checkpoints.",
    "resume_from": "An intermediate checkpoint of an earlier run, as Load Checkpoint lists it (e.g. "
                   "kiln/dreambooth-step00000500.safetensors): training continues from its weights, and with the "
                   ".kiln-state beside it and the same seed, data and settings, bit-identically to the run that never "
                   "stopped. Empty = start from the input model.",
}

OPTIONS: tuple[Option, ...] = (
    # --- widgets every Train node shows (schedule, optimizer, precision, loss, previews, saving) ---
    _w("steps", "int", 500, "Optimizer steps to train (kohya max_train_steps); typical 500-3000 for a LoRA. "
       "training_args max_train_epochs=N trains N epochs instead.", low=1, high=1_000_000,
       kohya=("max_train_steps",), metadata=("max_train_steps",), resumable=True),
    _w("learning_rate", "float", 1e-4, "Learning rate of the diffusion model's LoRA (kohya unet_lr); typical 1e-4 "
       "(SD1/SDXL), 1e-4 to 5e-4 (SD3); about 1.0 for the optimizers that set their own rate (Prodigy, "
       "D-Adaptation).", low=0.0, high=10.0, step=1e-6, kohya=("learning_rate",),
       metadata=("learning_rate", "unet_lr"), resumable=True,
       variants={"dreambooth": {"default": 1e-6, "help": "Learning rate of the UNet (kohya learning_rate); typical "
                                                         "1e-6 to 5e-6 for a full fine-tune."}}),
    _w("optimizer", "choice", "AdamW", "kohya's optimizer_type. AdamW is the safe default; AdamW8bit and the "
       "other 8bit ones need less memory (bitsandbytes); Prodigy and D-Adaptation choose their own step size "
       "(learning_rate ~1). training_args optimizer_args passes its settings.", choices=OPTIMIZERS,
       kohya=("optimizer_type",), group="optim"),
    _w("lr_scheduler", "choice", "constant", "How the learning rate moves over the run (kohya lr_scheduler): "
       "constant, or cosine / linear down to 0 at the last step; warmup_steps ramps it up first.",
       choices=SCHEDULERS, kohya=("lr_scheduler",), metadata=("lr_scheduler",), resumable=True, group="schedule"),
    _w("warmup_steps", "int", 0, "Steps over which the learning rate rises from 0 to learning_rate (kohya "
       "lr_warmup_steps); 0 = none.", low=0, high=100_000, kohya=("lr_warmup_steps",), resumable=True,
       group="schedule"),
    _w("grad_accum", "int", 1, "Batches whose gradients add up before each optimizer step (kohya "
       "gradient_accumulation_steps): the effective batch is batch_size × grad_accum, at batch_size's memory.",
       low=1, high=1024, kohya=("gradient_accumulation_steps",), metadata=("gradient_accumulation_steps",)),
    _w("max_grad_norm", "float", 1.0, "0 = no clipping.", low=0.0, high=1000.0, step=0.1, kohya=("max_grad_norm",),
       metadata=("max_grad_norm",), group="optim"),
    _w("seed", "int", 0, "Seed of the data order, noise, timesteps and previews: the same seed, data and "
       "settings give the same run.", low=0, high=0xFFFFFFFF, kohya=("seed",), metadata=("seed",),
       extra={"control_after_generate": True}),
    _w("precision", "choice", "auto", "Autocast dtype; auto = bf16 on GPUs that support it, else fp32. LoRA weights "
       "stay fp32.", choices=PRECISION_CHOICES, config=False),
    _w("gradient_checkpointing", "bool", False, "Less memory, ~30% slower.", kohya=("gradient_checkpointing",),
       metadata=("gradient_checkpointing",), group="memory"),
    _w("loss_type", "choice", "l2", "kohya's loss_type: l2 (mean squared error, the usual), l1, huber or "
       "smooth_l1 (less pulled by outliers; huber_c and huber_schedule in training_args).", choices=LOSS_TYPES,
       kohya=("loss_type",), metadata=("loss_type",), group="loss"),
    _w("min_snr_gamma", "float", 0.0, "0 = off; 5 is the paper's value.", low=0.0, high=100.0, step=0.5,
       families=DDPM, kohya=("min_snr_gamma",), metadata=("min_snr_gamma",), group="loss"),
    _w("mask_normalize", "bool", False, "Mean loss over the masked area, so small subjects weigh as much as large "
       "ones.", group="loss"),
    _w("prior_loss_weight", "float", 1.0, "Loss weight of regularization images.", low=0.0, high=100.0, step=0.1,
       kohya=("prior_loss_weight",), metadata=("prior_loss_weight",), group="loss"),
    _w("sample_prompts", "text", "", "One prompt per line, sampled during and after training, with kohya's options: "
       "--n negative, --w/--h size, --d seed, --s steps, --l CFG, --ss sampler (e.g. 'a toy --n blurry --w 768 --h 512 "
       "--d 42'). Or the path of a kohya prompt file (.txt/.toml/.json; relative: in ComfyUI's input folder). Empty: "
       "the first caption.", config=False),
    _w("sample_every", "int", 0, "Preview a sample every N steps; 0 = only at the end.", low=0, high=100_000,
       kohya=("sample_every_n_steps",), config=False),
    _w("sample_steps", "int", 20, "Sampling steps of each preview (a prompt's --s overrides it).", low=1, high=150,
       config=False),
    _w("sample_cfg", "float", 7.0, "CFG scale of the previews (a prompt's --l overrides it).", low=0.0, high=30.0,
       step=0.5, config=False, variants={"sd3": {"default": 5.0}, "flux": {"default": 1.0}}),
    _w("sample_negative", "text", "", "Negative prompt of the sample previews.", optional=True, config=False),
    _w("save_every_n_steps", "int", 0, "Also write the LoRA (and a .kiln-state file to resume from) every N steps, the "
       "last step too (as kohya), as <save_name>-stepNNNNNNNN.safetensors in models/loras. 0 = off.", low=0,
       high=1_000_000, optional=True, kohya=("save_every_n_steps",), config=False,
       variants={"dreambooth": {"help": DREAMBOOTH_SAVES["save_every_n_steps"]}}),
    _w("save_name", "str", "kiln/checkpoint", "Name (inside models/loras) of the intermediate LoRAs.", optional=True,
       config=False, variants={"dreambooth": {"default": "kiln/dreambooth", "help": DREAMBOOTH_SAVES["save_name"]}}),
    _w("resume_from", "str", "", "A LoRA in models/loras to continue from, e.g. "
       "kiln/checkpoint-step00000500.safetensors. "
       "With its .kiln-state beside it and the same seed, data and steps, training continues exactly where it stopped; "
       "otherwise it starts from the LoRA's weights.", optional=True, config=False,
       variants={"dreambooth": {"help": DREAMBOOTH_SAVES["resume_from"]}}),
    _w("cache_text_encoder_outputs_to_disk", "bool", False, "Keep the text encoders' outputs per caption on disk "
       "(ComfyUI's user/__kiln_cache/text), so the next run skips encoding. Not with caption augmentation or "
       "text-encoder training (the outputs change every step).", optional=True,
       kohya=("cache_text_encoder_outputs_to_disk",), config=False),
    # --- SD3's widgets: kohya's sd3_train_network options, same names ---
    _w("weighting_scheme", "choice", "uniform", "Timestep density (uniform, logit_normal, mode) or loss weighting "
       "(cosmap, sigma_sqrt). Flux: the density of timestep_sampling=sigma, and the loss weight of "
       "model_prediction_type=sigma_scaled (kohya).", choices=WEIGHTING_SCHEMES, families=FLOW,
       kohya=("weighting_scheme",),
       metadata=("weighting_scheme",), config=False),
    _w("logit_mean", "float", 0.0, "weighting_scheme logit_normal: mean of the normal the timesteps are drawn "
       "through (kohya's 0 = centred; below 0 cleaner, above noisier).", low=-10.0, high=10.0, step=0.1,
       families=FLOW, kohya=("logit_mean",), metadata=("logit_mean",), config=False),
    _w("logit_std", "float", 1.0, "weighting_scheme logit_normal: its standard deviation (kohya's 1).", low=0.01,
       high=10.0, step=0.1, families=FLOW, kohya=("logit_std",), metadata=("logit_std",), config=False),
    _w("mode_scale", "float", 1.29, "weighting_scheme mode: how strongly the timesteps gather at the middle "
       "(kohya's 1.29).", low=-10.0, high=10.0, step=0.01, families=FLOW, kohya=("mode_scale",),
       metadata=("mode_scale",), config=False),
    _w("training_shift", "float", 1.0, ">1 samples noisier timesteps (structure), <1 cleaner ones (detail).",
       low=0.01, high=100.0, step=0.1, families=("sd3",), kohya=("training_shift",), config=False),
    _w("t5xxl_max_token_length", "int", 256, "T5-XXL tokens per caption (kohya's 256); longer captions are "
       "cut.", low=1, high=512, families=("sd3", "flux"), kohya=("t5xxl_max_token_length",), config=False,
       variants={"flux": {"default": 0, "low": 0, "help": "T5-XXL tokens (cut or padded to this); 0 = kohya's "
                          "default: 512 for dev and Chroma, 256 for schnell. ComfyUI's own encode pads to 256 at "
                          "least."}}),
    _w("apply_lg_attn_mask", "bool", False, "Zero CLIP-L/G outputs at padding tokens.", families=("sd3",),
       kohya=("apply_lg_attn_mask",), metadata=("apply_lg_attn_mask",), config=False),
    _w("apply_t5_attn_mask", "bool", False, "Zero T5 outputs at padding tokens.", families=("sd3", "flux"),
       kohya=("apply_t5_attn_mask",), metadata=("apply_t5_attn_mask",), config=False),
    _w("clip_l_dropout_rate", "float", 0.0, "Chance per caption that CLIP-L's output is zeroed for the step "
       "(kohya's clip_l_dropout_rate), so the model also learns without it.", low=0.0, high=1.0, step=0.01,
       families=("sd3",), kohya=("clip_l_dropout_rate",), config=False),
    _w("clip_g_dropout_rate", "float", 0.0, "Chance per caption that CLIP-G's output is zeroed for the step "
       "(kohya's clip_g_dropout_rate).", low=0.0, high=1.0, step=0.01, families=("sd3",),
       kohya=("clip_g_dropout_rate",), config=False),
    _w("t5_dropout_rate", "float", 0.0, "Chance per caption that T5-XXL's output is zeroed for the step "
       "(kohya's t5_dropout_rate).", low=0.0, high=1.0, step=0.01, families=("sd3",), kohya=("t5_dropout_rate",),
       config=False),
    _w("pos_emb_random_crop_rate", "float", 0.0, "SD3.5: probability of a random (not centred) position-embedding "
       "crop per step.", low=0.0, high=1.0, step=0.01, families=("sd3",), kohya=("pos_emb_random_crop_rate",),
       config=False),
    # --- Flux's widgets: kohya's flux_train_network options, same names, meaning and defaults ---
    _w("timestep_sampling", "choice", "sigma", "How sigma is drawn: sigma (weighting_scheme's density on the shifted "
       "1000-step schedule), uniform, sigmoid (of sigmoid_scale x N(0,1)), shift (sigmoid, then discrete_flow_shift), "
       "flux_shift (sigmoid, then FLUX.1's resolution-dependent shift).", choices=TIMESTEP_SAMPLING,
       families=("flux", ANY), kohya=("timestep_sampling",), metadata=("timestep_sampling",), config=False,
       variants={ANY: {"default": "shift", "help": "Flow models: how sigma is drawn (kohya's timestep_sampling): shift "
                       "(sigmoid of sigmoid_scale x N(0,1), then discrete_flow_shift), sigma, uniform, sigmoid, "
                       "flux_shift. DDPM (eps/v) models draw timesteps uniformly and ignore it."}}),
    _w("sigmoid_scale", "float", 1.0, "Scale of the normal draw of the sigmoid, shift and flux_shift samplings.",
       low=0.01, high=100.0, step=0.1, families=("flux", ANY), kohya=("sigmoid_scale",), metadata=("sigmoid_scale",),
       config=False),
    _w("discrete_flow_shift", "float", 3.0, "Shift of timestep_sampling sigma and shift (>1: noisier).", low=0.01,
       high=100.0, step=0.01, families=("flux", ANY), kohya=("discrete_flow_shift",), metadata=("discrete_flow_shift",),
       config=False, variants={ANY: {"default": 0.0, "low": 0.0, "help": "Flow models: the shift of timestep_sampling "
                                     "sigma and shift (>1: noisier); 0 = the shift ComfyUI samples this model with "
                                     "(its model sampling)."}}),
    _w("model_prediction_type", "choice", "sigma_scaled", "How the prediction is compared with noise - latents: raw, "
       "additive (+ noisy input) or sigma_scaled (noisy input - sigma x prediction, weighted by weighting_scheme).",
       choices=PREDICTION_TYPES, families=("flux", ANY), kohya=("model_prediction_type",),
       metadata=("model_prediction_type",), config=False,
       variants={ANY: {"default": "raw", "help": "Flow models: how the prediction is compared with the target noise - "
                       "latents: raw (the velocity, as ComfyUI samples it), additive or sigma_scaled (kohya's)."}}),
    _w("guidance_scale", "float", 3.5, "The guidance FLUX.1 dev is called with while training (kohya's; kohya "
       "recommends 1.0 for dev; Chroma requires 0; schnell ignores it). The conditioning's guidance is not used.",
       low=0.0, high=100.0, step=0.1, families=("flux",), kohya=("guidance_scale",), metadata=("guidance_scale",),
       config=False),
    # --- text-encoder learning rates (LoRA nodes; the CLI maps kohya's text_encoder_lr list onto them) ---
    _te_lr("text_encoder_lr", "text encoder", dreambooth={
        "step": 1e-7, "help": "Learning rate of the text encoder (kohya learning_rate_te); 0 = the text encoder does "
                              "not train (kohya stop_text_encoder_training=-1)."}),
    _te_lr("text_encoder_lr1", "CLIP-L"),
    _te_lr("text_encoder_lr2", "CLIP-G"),
    _te_lr("text_encoder_lr3", "T5-XXL"),
    # --- DreamBooth's own widgets (kohya's train_db.py) ---
    _w("stop_text_encoder_training", "int", 0, "The text encoder trains in the first N steps only, then only the UNet "
       "(kohya's meaning); 0 = it trains to the end.", low=0, high=1_000_000, optional=True, config=False),
    _w("fused_backward_pass", "bool", False, "Step each weight as soon as its gradient is ready and free that "
       "gradient: the gradients of the whole model are never held together. Needs max_grad_norm 0, grad_accum 1, "
       "no fp16.", optional=True, config=False),
    # the last widget of every Train node: the rest of kohya's options as key=value lines (the keys below)
    _w("training_args", "text", "", "More kohya options as key=value, one per line (kohya's names and meaning), "
       "e.g. max_train_epochs=10.", optional=True, config=False),

    # --- training_args: epochs and saving (kohya counts an epoch as every image × repeats once, reg images balanced)
    _ta("max_train_epochs", "int", None, "train this many epochs (overrides steps)", 1),
    _ta("save_every_n_epochs", "int", None, "also write the LoRA (+ a resumable state) every N epochs", 1,
        group="saving"),
    _ta("save_last_n_epochs", "int", None, "keep only the last N epoch saves (older ones removed)", 1, group="saving"),
    _ta("save_last_n_steps", "int", None, "keep step saves of the last N steps only (older ones removed)", 1,
        group="saving"),
    _ta("sample_every_n_epochs", "int", None, "preview a sample every N epochs", 1, group="samples"),
    # noise (SD1/SDXL)
    _ta("noise_offset", "float", None, "offset noise strength (~0.1)", 0.0, 1.0, families=DDPM,
        metadata=("noise_offset",), group="noise"),
    _ta("noise_offset_random_strength", "bool", False, "offset strength drawn in [0, noise_offset]", families=DDPM,
        metadata=("noise_offset_random_strength",), group="noise"),
    _ta("adaptive_noise_scale", "float", None, "add |latent mean| × this to noise_offset", -1.0, 1.0, families=DDPM,
        metadata=("adaptive_noise_scale",), group="noise"),
    _ta("multires_noise_iterations", "int", None, "pyramid (multires) noise levels (6-10)", 1, 64, families=DDPM,
        metadata=("multires_noise_iterations",), group="noise"),
    _ta("multires_noise_discount", "float", 0.3, "weight discount per multires level", 0.0, 1.0, families=DDPM,
        metadata=("multires_noise_discount",), group="noise"),
    _ta("ip_noise_gamma", "float", None, "input perturbation noise (~0.1)", 0.0, 1.0, families=DDPM,
        metadata=("ip_noise_gamma",), group="noise"),
    _ta("ip_noise_gamma_random_strength", "bool", False, "perturbation drawn in [0, ip_noise_gamma]", families=DDPM,
        metadata=("ip_noise_gamma_random_strength",), group="noise"),
    _ta("zero_terminal_snr", "bool", False, "rescale the noise schedule to zero terminal SNR", families=DDPM,
        metadata=("zero_terminal_snr",), group="noise"),
    _ta("min_timestep", "int", None, "lowest training timestep (0-999)", 0, 999, metadata=("min_timestep",),
        group="noise", families=("sd1", "sdxl", "sd3", ANY)),  # kohya's Flux draws sigma by timestep_sampling alone
    _ta("max_timestep", "int", None, "highest training timestep, exclusive (1-1000)", 1, 1000,
        metadata=("max_timestep",), group="noise", families=("sd1", "sdxl", "sd3", ANY)),
    # loss
    _ta("huber_schedule", "choice", "snr", "huber_c over timesteps (loss_type huber/smooth_l1)",
        choices=HUBER_SCHEDULES, metadata=("huber_schedule",), group="loss"),
    _ta("huber_c", "float", 0.1, "Huber threshold (loss_type huber/smooth_l1)", 1e-6, 1.0, metadata=("huber_c",),
        group="loss"),
    _ta("huber_scale", "float", 1.0, "Huber threshold scale (constant/exponential schedules)", 1e-6, 100.0,
        metadata=("huber_scale",), group="loss"),
    _ta("v_pred_like_loss", "float", None, "add a v-prediction-like loss × this", 0.0, 100.0, families=DDPM,
        metadata=("v_pred_like_loss",), group="loss"),
    _ta("debiased_estimation_loss", "bool", False, "weight the loss by 1/√SNR (v: 1/(SNR+1))", families=DDPM,
        metadata=("debiased_estimation",), group="loss"),
    _ta("scale_v_pred_loss_like_noise_pred", "bool", False, "scale a v loss like an ε loss (SNR/(SNR+1))",
        families=DDPM, metadata=("scale_v_pred_loss_like_noise_pred",), group="loss"),
    _ta("scale_weight_norms", "float", None, "max-norm regularisation: after every step, scale each LoRA module whose "
        "change up·down·α/r has a norm above this back to it (~1; LoRA and DoRA only)", 1e-6, 1000.0,
        metadata=("scale_weight_norms",), group="optim"),
    # optimizer and schedule (the node's optimizer / lr_scheduler / warmup_steps widgets stay; these refine them)
    _ta("optimizer_type", "str", "", "overrides the optimizer widget: a kohya name or a class path such as "
        "pytorch_optimizer.CAME or torch.optim.RAdam", group="optim"),
    _ta("optimizer_args", "kwargs", None, "optimizer keyword arguments, e.g. [weight_decay=0.1 betas=0.9,0.99]",
        group="optim"),
    _ta("lr_warmup_steps", "steps", None, "overrides warmup_steps; below 1 = that fraction of all steps", 0,
        group="schedule"),
    _ta("lr_decay_steps", "steps", 0, "decay steps of warmup_stable_decay; below 1 = fraction of all steps", 0,
        group="schedule"),
    _ta("lr_scheduler_num_cycles", "int", 1, "restarts of cosine_with_restarts (cycles of the min-lr schedules)", 1,
        group="schedule"),
    _ta("lr_scheduler_power", "float", 1.0, "power of the polynomial schedule", 0.0, 100.0, group="schedule"),
    _ta("lr_scheduler_min_lr_ratio", "float", None, "lowest lr as a fraction (cosine_with_min_lr, "
        "warmup_stable_decay)", 0.0, 1.0, group="schedule"),
    _ta("lr_scheduler_type", "str", "", "a scheduler class path, e.g. torch.optim.lr_scheduler.StepLR (overrides "
        "lr_scheduler)", group="schedule"),
    _ta("lr_scheduler_args", "kwargs", None, "scheduler keyword arguments, e.g. [step_size=100 gamma=0.5]",
        group="schedule"),
    # validation loss (kohya >= 0.10)
    _ta("validation_split", "float", None, "fraction of each folder's images held out for a validation loss",
        0.0, 0.9, metadata=("validation_split",), group="validation"),
    _ta("validation_seed", "int", None, "seed of the split and of the validation noise (default: seed)", 0,
        metadata=("validation_seed",), group="validation"),
    _ta("validate_every_n_steps", "int", None, "also measure the validation loss every N steps", 1,
        metadata=("validate_every_n_steps",), group="validation"),
    _ta("validate_every_n_epochs", "int", None, "measure it every N epochs (default: every epoch)", 1,
        metadata=("validate_every_n_epochs",), group="validation"),
    _ta("max_validation_steps", "int", None, "use at most N validation batches", 1,
        metadata=("max_validation_steps",), group="validation"),
    # text encoders (SD1/SD2, SDXL)
    _ta("max_token_length", "int", None, "caption tokens trained: 75, 150 or 225 (kohya's 1-3 windows of 75; "
        "longer captions are cut, with a warning)", 75, 225, families=("sd1", "sdxl"), metadata=("max_token_length",),
        group="text"),
    _ta("clip_skip", "int", None, "train (and preview) with the CLIP's Nth layer from the end, 2 = penultimate, "
        "as CLIP Set Last Layer -N; SD1/SD2 (kohya ignores it for SDXL)", 1, 12, families=("sd1",),
        metadata=("clip_skip",), group="text"),
    _ta("weighted_captions", "bool", False, "read captions with ComfyUI's prompt weighting ((tag:1.2), (tag) = 1.1); "
        "off: plain text, brackets trained as written (kohya's default)", group="text"),
    # sample previews (kohya's sample_* options; prompts go in the node's sample_prompts)
    _ta("sample_sampler", "choice", None, "preview sampler by kohya's name (ddim, euler, euler_a, dpmsolver++, "
        "...; mapped onto ComfyUI's samplers); a prompt's --ss overrides it", choices=tuple(SAMPLERS), group="samples"),
    _ta("sample_at_first", "bool", False, "also preview before the first step", group="samples"),
    _ta("fused_backward_pass", "bool", False, "step each parameter as soon as its gradient is ready (less "
        "memory); not with grad_accum > 1, max_grad_norm > 0, fp16, Prodigy/D-Adaptation", group="optim"),
    # memory (block_swap.py; the base weights' dtype is ComfyUI's to choose when it loads them)
    _ta("blocks_to_swap", "int", 0, "keep the weights of the network's last N blocks in host memory; each visits "
        "the device only for its forward and backward (SD3: joint blocks; SD1/SDXL: the UNet's ResBlocks, "
        "transformers and resamplers; Flux: as kohya, N // 2 double blocks and 2 x (N - N // 2) single blocks)", 0,
        group="memory"),
    _ta("split_mode", "bool", False, "kohya's obsolete Flux option: refused; use blocks_to_swap (kohya sets 18 for it)",
        families=("flux",), group="memory"),
    _ta("cpu_offload_checkpointing", "bool", False, "with gradient_checkpointing: keep each checkpointed block's "
        "saved inputs in host memory until its backward (not with blocks_to_swap)", group="memory"),
    _ta("fp8_base", "bool", False, "kohya's fp8 base model: requires a MODEL whose weights ComfyUI loaded as fp8 (Load "
        "Diffusion Model, weight_dtype fp8_e4m3fn; cli.py loads a kohya config's model so)", metadata=("fp8_base",),
        group="memory"),
    _ta("fp8_base_unet", "bool", False, "as fp8_base, for the diffusion model only (the text encoders as loaded)",
        metadata=("fp8_base_unet",), group="memory"),
    # logging (tracking.py): TensorBoard event files, kohya's folder layout and tags
    _ta("logging_dir", "str", None, "write loss, learning rates, validation loss and samples as TensorBoard "
        "events under this folder (needs: pip install tensorboard)", group="logging"),
    _ta("log_prefix", "str", None, "prefix of the run's folder name (before its timestamp)", group="logging"),
    _ta("log_with", "choice", None, "tensorboard (the only backend; wandb is refused)",
        choices=("tensorboard", "wandb", "all"), group="logging"),
    _ta("log_tracker_name", "str", None, "sub-folder of the run (default: network_train)", group="logging"),
    # beyond kohya: an exponential moving average of the trained weights (ema.py)
    _ta("ema_decay", "float", 0.0, "keep an EMA of the trained weights (e.g. 0.999; 0 = off): saves, previews, "
        "validation loss and the output use it", 0.0, 0.99999, resumable=True, group="ema"),
    _ta("ema_update_every", "int", 1, "update the EMA every N optimizer steps", 1, resumable=True, group="ema"),
    _ta("ema_warmup", "bool", True, "EMA decay min(ema_decay, (1+n)/(10+n)) at the n-th update, so the first "
        "updates follow the weights", group="ema"),
    _ta("ema_on_host", "bool", False, "keep the EMA in host memory, not on the training device", group="ema"),
    # beyond kohya's form: prior preservation without regularization images (preservation.py)
    _ta("diff_output_preservation", "bool", False, "keep the prediction for each caption with its trigger "
        "replaced by the class (sks dog -> dog) at the base model's (adapters off)", group="preservation"),
    _ta("diff_output_preservation_multiplier", "float", 1.0, "weight of that preservation loss", 0.0, 1000.0,
        group="preservation"),
    _ta("diff_output_preservation_trigger", "str", "", "the trigger words (default: from the dataset: the "
        "subset's class_tokens)", group="preservation"),
    _ta("diff_output_preservation_class", "str", "", "the class words that replace them (default: the N_name "
        "folder's name)", group="preservation"),
)

BY_NAME: dict[str, Option] = {}
for _o in OPTIONS:
    BY_NAME.setdefault(_o.name, _o)  # fused_backward_pass is both a DreamBooth widget and a training_args key

TRAINING_ARGS: dict[str, Option] = {o.name: o for o in OPTIONS if not o.widget}

_LORA_COMMON = ("steps", "learning_rate", "optimizer", "lr_scheduler", "warmup_steps", "grad_accum", "max_grad_norm",
                "seed", "precision", "gradient_checkpointing", "loss_type", "min_snr_gamma", "mask_normalize",
                "prior_loss_weight", "sample_prompts", "sample_every", "sample_steps", "sample_cfg", "sample_negative",
                "save_every_n_steps", "save_name", "resume_from", "cache_text_encoder_outputs_to_disk")
_SAVES = ("save_every_n_steps", "save_name", "resume_from")
_SD3 = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_shift", "t5xxl_max_token_length",
        "apply_lg_attn_mask", "apply_t5_attn_mask", "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate",
        "pos_emb_random_crop_rate")
_FLUX = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type", "guidance_scale",
         "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "t5xxl_max_token_length", "apply_t5_attn_mask")
# each Train node's widgets, in the order saved workflows hold their values: append only
LAYOUTS: dict[str, tuple[str, ...]] = {
    "sd1": _LORA_COMMON + ("text_encoder_lr", "training_args"),
    "sdxl": _LORA_COMMON + ("text_encoder_lr1", "text_encoder_lr2", "training_args"),
    "sd3": tuple(n for n in _LORA_COMMON if n != "min_snr_gamma") + _SD3
    + ("text_encoder_lr1", "text_encoder_lr2", "text_encoder_lr3", "training_args"),
    "flux": tuple(n for n in _LORA_COMMON if n != "min_snr_gamma") + _FLUX
    + ("text_encoder_lr1", "text_encoder_lr3", "training_args"),
    ANY: _LORA_COMMON + ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
                         "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_args"),
    "dreambooth": tuple(n for n in _LORA_COMMON if n not in _SAVES)
    + ("text_encoder_lr", "stop_text_encoder_training", "fused_backward_pass") + _SAVES + ("training_args",),
}
WIDGETS: dict[str, Option] = {o.name: o for o in OPTIONS if o.widget}
# the widgets a Train node shows a new user; the others are "advanced" inputs, one click away in the frontend (they
# still show where a workflow sets them away from their default: js/kiln.js). Showing or hiding never moves a value.
SHOWN = ("steps", "learning_rate", "optimizer", "lr_scheduler", "warmup_steps", "seed", "precision",
         "gradient_checkpointing", "sample_prompts", "sample_every", "save_every_n_steps", "training_args")


def widget(name: str, kind: str) -> Option:
    """The widget ``name`` as node ``kind`` shows it."""
    return WIDGETS[name].for_node(kind)


def widgets(kind: str) -> list[Option]:
    """Node ``kind``'s widgets in their saved order."""
    return [widget(name, kind) for name in LAYOUTS[kind]]


def training_args(family: str) -> dict[str, Option]:
    """The training_args keys ``family`` reads."""
    return {k: o for k, o in TRAINING_ARGS.items() if family in o.families}


def resumable() -> tuple[str, ...]:
    """The options a resume may change (they take effect from the resumed step)."""
    return tuple(o.name for o in OPTIONS if o.resumable)


def config_widgets() -> tuple[str, ...]:
    """The widgets whose value goes into TrainConfig as given (a field of the same name)."""
    return tuple(dict.fromkeys(o.name for o in OPTIONS if o.widget and o.config))


def metadata_of(config) -> dict[str, object]:
    """The ss_* keys that record a TrainConfig field as given (kohya's names), e.g. noise_offset, max_train_steps."""
    return {key: config.get(o.name) for o in OPTIONS if o.config for key in o.metadata}


def widget_metadata(values: dict, kind: str) -> dict[str, object]:
    """The ss_* keys that record widgets outside TrainConfig (e.g. SD3's weighting_scheme), from a node's values."""
    return {key: values[o.name] for o in widgets(kind) if not o.config for key in o.metadata if o.name in values}


def kohya_widget_keys() -> dict[str, str]:
    """kohya config key -> the Train node widget it sets (same value)."""
    return {k: o.name for o in OPTIONS if o.widget for k in o.kohya}
