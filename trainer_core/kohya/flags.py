"""kohya's command line: the flags each of its training scripts takes and the kind of value each flag takes (a
switch, an integer, a number, text, a list), as kohya's argparse declares them (sd-scripts' library/train_util.py
``add_*_arguments``, custom_train_functions.py, deepspeed_utils.py, sai_model_spec.py and each script's
``setup_parser``; read there, listed here). ``command_line.py`` reads a pasted kohya command with them into the keys
a ``--config_file`` gives, so one mapping (config.py) serves both.
"""
from __future__ import annotations


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# every script has these (train_network.py and train_db.py alike; the SDXL/SD3/Flux LoRA scripts add theirs)
_COMMON = _names("""
    adaptive_noise_scale alpha_mask async_upload bucket_no_upscale bucket_reso_steps cache_info cache_latents
    cache_latents_to_disk caption_dropout_every_n_epochs caption_dropout_rate caption_extension
    caption_extention caption_prefix caption_separator caption_suffix caption_tag_dropout_rate clip_skip
    color_aug conditioning_data_dir config_file console_log_file console_log_level console_log_simple
    dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout
    debiased_estimation_loss debug_dataset deepspeed dynamo_backend enable_bucket enable_wildcard
    face_crop_aug_range flip_aug fp16_master_weights_and_gradients fp8_base full_bf16 full_fp16
    fused_backward_pass gradient_accumulation_steps gradient_checkpointing highvram huber_c huber_scale
    huber_schedule huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
    huggingface_repo_visibility huggingface_token in_json ip_noise_gamma ip_noise_gamma_random_strength
    keep_tokens keep_tokens_separator learning_rate log_config log_prefix log_tracker_config log_tracker_name
    log_with logging_dir loss_type lowram lr_decay_steps lr_scheduler lr_scheduler_args
    lr_scheduler_min_lr_ratio lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_timescale
    lr_scheduler_type lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers max_grad_norm
    max_timestep max_token_length max_train_epochs max_train_steps mem_eff_attn metadata_author
    metadata_description metadata_is_negative_embedding metadata_license metadata_merged_from
    metadata_preprocessor metadata_tags metadata_thumbnail metadata_title metadata_trigger_phrase
    metadata_usage_hint min_bucket_reso min_snr_gamma min_timestep mixed_precision multires_noise_discount
    multires_noise_iterations no_half_vae noise_offset noise_offset_random_strength offload_optimizer_device
    offload_optimizer_nvme_path offload_param_device offload_param_nvme_path optimizer_args optimizer_type
    output_config output_dir output_name persistent_data_loader_workers pretrained_model_name_or_path
    prior_loss_weight random_crop reg_data_dir resize_interpolation resolution resume resume_from_huggingface
    sample_at_first sample_every_n_epochs sample_every_n_steps sample_prompts sample_sampler save_every_n_epochs
    save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state
    save_model_as save_n_epoch_ratio save_precision save_state save_state_on_train_end save_state_to_huggingface
    scale_v_pred_loss_like_noise_pred sdpa secondary_separator seed shuffle_caption skip_cache_check
    token_warmup_min token_warmup_step tokenizer_cache_dir torch_compile train_batch_size train_data_dir
    use_8bit_adam use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size wandb_api_key
    wandb_run_name weighted_captions xformers zero3_init_flag zero3_save_16bit_model zero_stage
    zero_terminal_snr
""")
# train_network.py (and the other LoRA scripts), not train_db.py
_LORA = _names("""
    base_weights base_weights_multiplier cpu_offload_checkpointing dim_from_weights fp8_base_unet initial_epoch
    initial_step max_validation_steps network_alpha network_args network_dim network_dropout network_module
    network_train_text_encoder_only network_train_unet_only network_weights no_metadata scale_weight_norms
    skip_until_initial_step text_encoder_lr training_comment unet_lr validate_every_n_epochs
    validate_every_n_steps validation_seed validation_split
""")
# train_db.py only
_DREAMBOOTH = _names("""
    learning_rate_te no_token_padding stop_text_encoder_training use_safetensors
""")
# each family's LoRA script adds these to train_network.py's
_SDXL = _names("""
    cache_text_encoder_outputs cache_text_encoder_outputs_to_disk disable_mmap_load_safetensors
""")
_SD3 = _names("""
    apply_lg_attn_mask apply_t5_attn_mask blocks_to_swap cache_text_encoder_outputs
    cache_text_encoder_outputs_to_disk clip_g clip_g_dropout_rate clip_l clip_l_dropout_rate
    disable_mmap_load_safetensors enable_scaled_pos_embed logit_mean logit_std mode_scale
    pos_emb_random_crop_rate save_clip save_t5xxl t5_dropout_rate t5xxl t5xxl_device t5xxl_dtype
    t5xxl_max_token_length text_encoder_batch_size training_shift weighting_scheme
""")
_FLUX = _names("""
    ae apply_t5_attn_mask blocks_to_swap cache_text_encoder_outputs cache_text_encoder_outputs_to_disk clip_l
    controlnet_model_name_or_path disable_mmap_load_safetensors discrete_flow_shift guidance_scale logit_mean
    logit_std mode_scale model_prediction_type model_type sigmoid_scale split_mode t5xxl t5xxl_max_token_length
    text_encoder_batch_size timestep_sampling weighting_scheme
""")

# script -> (the family it trains, the flags it takes). train_network.py trains SD 1.x/2.x (v2 says which), train_db.py
# fine-tunes the whole SD 1.x/2.x model (DreamBooth)
SCRIPTS: dict[str, tuple[str, frozenset[str]]] = {
    "train_network.py": ("sd1", _COMMON | _LORA),
    "sdxl_train_network.py": ("sdxl", _COMMON | _LORA | _SDXL),
    "sd3_train_network.py": ("sd3", _COMMON | _LORA | _SD3),
    "flux_train_network.py": ("flux", _COMMON | _LORA | _FLUX),
    "train_db.py": ("sd1", _COMMON | _DREAMBOOTH),
}
DREAMBOOTH_SCRIPTS = ("train_db.py",)
FLAGS = frozenset().union(*(flags for _, flags in SCRIPTS.values()))

# the kind of value: a switch (store_true) takes none; a list (nargs="*") takes any number; the rest take one
SWITCHES = _names("""
    alpha_mask apply_lg_attn_mask apply_t5_attn_mask async_upload bucket_no_upscale cache_info cache_latents
    cache_latents_to_disk cache_text_encoder_outputs cache_text_encoder_outputs_to_disk color_aug
    console_log_simple cpu_offload_checkpointing ddp_gradient_as_bucket_view ddp_static_graph
    debiased_estimation_loss debug_dataset deepspeed dim_from_weights disable_mmap_load_safetensors
    enable_bucket enable_scaled_pos_embed enable_wildcard flip_aug fp16_master_weights_and_gradients fp8_base
    fp8_base_unet full_bf16 full_fp16 fused_backward_pass gradient_checkpointing highvram
    ip_noise_gamma_random_strength log_config lowram masked_loss mem_eff_attn network_train_text_encoder_only
    network_train_unet_only no_half_vae no_metadata no_token_padding noise_offset_random_strength output_config
    persistent_data_loader_workers random_crop resume_from_huggingface sample_at_first save_clip save_state
    save_state_on_train_end save_state_to_huggingface save_t5xxl scale_v_pred_loss_like_noise_pred sdpa
    shuffle_caption skip_cache_check skip_until_initial_step split_mode torch_compile use_8bit_adam
    use_lion_optimizer use_safetensors v2 v_parameterization weighted_captions xformers zero3_init_flag
    zero3_save_16bit_model zero_terminal_snr
""")
INTS = _names("""
    blocks_to_swap bucket_reso_steps caption_dropout_every_n_epochs clip_skip dataset_repeats ddp_timeout
    gradient_accumulation_steps initial_epoch initial_step keep_tokens lr_scheduler_num_cycles
    lr_scheduler_timescale max_bucket_reso max_data_loader_n_workers max_timestep max_token_length
    max_train_epochs max_train_steps max_validation_steps min_bucket_reso min_timestep multires_noise_iterations
    network_dim sample_every_n_epochs sample_every_n_steps save_every_n_epochs save_every_n_steps
    save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_n_epoch_ratio
    seed stop_text_encoder_training t5xxl_max_token_length text_encoder_batch_size token_warmup_min
    train_batch_size vae_batch_size validate_every_n_epochs validate_every_n_steps validation_seed zero_stage
""")
FLOATS = _names("""
    adaptive_noise_scale caption_dropout_rate caption_tag_dropout_rate clip_g_dropout_rate clip_l_dropout_rate
    discrete_flow_shift guidance_scale huber_c huber_scale ip_noise_gamma learning_rate learning_rate_te
    logit_mean logit_std lr_scheduler_min_lr_ratio lr_scheduler_power max_grad_norm min_snr_gamma mode_scale
    multires_noise_discount network_alpha network_dropout noise_offset pos_emb_random_crop_rate
    prior_loss_weight scale_weight_norms sigmoid_scale t5_dropout_rate token_warmup_step training_shift unet_lr
    v_pred_like_loss validation_split
""")
FLOAT_LIST = _names("""
    base_weights_multiplier text_encoder_lr
""")
TEXT_LIST = _names("""
    base_weights lr_scheduler_args network_args optimizer_args
""")
STEPS = _names("""
    lr_decay_steps lr_warmup_steps
""")
# every other flag takes one text value (a path, a name, a choice)
