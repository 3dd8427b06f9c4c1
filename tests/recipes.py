"""The official recipes the shipped configs cite, written down from the official code (not copied from
the configs), with where each value was read. `tests/test_recipes.py` checks every shipped config
against this table, so a recipe cannot drift silently.

Keys are dotted paths into `mmpeft fit -c CONFIG --print_config`. A config's per-task or per-dataset
values are those of the task it runs by default (VTAB-1k: cifar; FGVC: CUB); the sweep files carry the
others.
"""

from __future__ import annotations

M, D, T, B = "model.init_args", "data.init_args", "trainer", "model.init_args.backbone.init_args"

SSF_SCHEDULE = {  # dongzelian/SSF train.py L168 (--sched cosine), L202 (--cooldown-epochs 10); timm 0.6.5
    # scheduler_factory.py L38-49: CosineLRScheduler(t_initial=epochs, lr_min, warmup_lr_init, warmup_t),
    # num_epochs = cycle length + cooldown
    f"{M}.schedule": "timm_cosine",
    f"{M}.warmup_epochs": 10,
    f"{M}.warmup_lr": 1e-7,
    f"{M}.min_lr": 1e-8,
    f"{M}.cooldown_epochs": 10,
    f"{T}.max_epochs": 110,
    f"{M}.optimizer": "adamw",
    f"{M}.method": {"name": "ssf", "preset": "paper"},
}
VPT_PROMPT = {  # KMnP/vpt configs/base-prompt.yaml L14-25: SGD momentum 0.9, warmup 10, 100 epochs, batch 128
    f"{M}.optimizer": "sgd",
    f"{M}.warmup_epochs": 10,
    f"{T}.max_epochs": 100,
    f"{D}.batch_size": 128,
}
VIT_DROPOUT = {  # KMnP/vpt and Theia-4869/MoSA src/configs/vit_configs.py get_b16_config L34-35 (dropout_rate 0.1,
    # attention_dropout_rate 0.0); src/models/vit_backbones/vit.py has no drop-path
    f"{B}.dropout": 0.1,
    f"{B}.drop_path_rate": 0.0,
}
NOAH = {  # ZhangYuanhan-AI/NOAH configs/LoRA/VTAB/slurm_train_lora_vtab.sh L12-36 (--batch-size 64 --lr 0.001
    # --epochs 100 --weight-decay 0.0001 --no_aug --direct_resize); supernet_train_prompt.py defaults: --opt adamw,
    # --sched cosine, --warmup-epochs 10, --warmup-lr 1e-6, --min-lr 1e-5, --drop-path 0.1 (L57-74)
    f"{M}.optimizer": "adamw",
    f"{M}.lr": 1e-3,
    f"{M}.weight_decay": 1e-4,
    f"{M}.schedule": "timm_cosine",
    f"{M}.warmup_epochs": 10,
    f"{M}.warmup_lr": 1e-6,
    f"{M}.min_lr": 1e-5,
    f"{T}.max_epochs": 100,
    f"{D}.batch_size": 64,
    f"{B}.drop_path_rate": 0.1,
    f"{M}.method": {"name": "lora", "preset": "paper"},
}
MOSA = {  # Theia-4869/MoSA configs/base-finetune.yaml (AdamW, warmup 10, 100 epochs, batch 128) and its AdamW's
    # fixed weight decay 0.01; vit_models.py L28-34: mosa runs keep the encoder in train mode (dropout on)
    f"{M}.optimizer": "adamw",
    f"{M}.weight_decay": 0.01,
    f"{M}.warmup_epochs": 10,
    f"{T}.max_epochs": 100,
    f"{D}.batch_size": 128,
    **VIT_DROPOUT,
}

RECIPES: dict[str, dict] = {
    "vtab/ssf.yaml": {  # dongzelian/SSF train_scripts/vit/vtab/cifar_100/train_ssf.sh: lr 5e-3, wd 5e-5, dp 0,
        # batch 32 x 2 GPUs, --no-aug --direct-resize, no mixup / CutMix / smoothing; timm in21k config mean/std 0.5
        **SSF_SCHEDULE,
        f"{M}.lr": 5e-3,
        f"{M}.weight_decay": 5e-5,
        f"{B}.drop_path_rate": 0.0,
        f"{D}.batch_size": 64,
        f"{D}.mean": [0.5, 0.5, 0.5],
        f"{D}.std": [0.5, 0.5, 0.5],
    },
    "fgvc/ssf.yaml": {  # dongzelian/SSF train_scripts/vit/fgvc/cub_2011/train_ssf.sh: lr 1e-2, wd 5e-2, dp 0,
        # --model-ema (decay 0.9998), --simple-aug, batch 32 x 2; train.py L216/L260 defaults: scale 0.08-1,
        # smoothing 0.1; models/vision_transformer.py L47-53 _cfg: crop_pct 0.9, bicubic, inception mean/std
        **SSF_SCHEDULE,
        f"{M}.lr": 1e-2,
        f"{M}.weight_decay": 0.05,
        f"{M}.ema_decay": 0.9998,
        f"{M}.label_smoothing": 0.1,
        f"{B}.drop_path_rate": 0.0,
        f"{D}.batch_size": 64,
        f"{D}.train_crop": "random_resized_crop",
        f"{D}.crop_scale": [0.08, 1.0],
        f"{D}.crop_pct": 0.9,
        f"{D}.interpolation": "bicubic",
        f"{D}.mean": [0.5, 0.5, 0.5],
        f"{D}.std": [0.5, 0.5, 0.5],
    },
    "vtab/lora.yaml": NOAH,
    "vtab/vpt_deep.yaml": {**VPT_PROMPT, f"{M}.method.name": "vpt", f"{M}.method.preset": "paper"},
    "vtab/vpt_shallow.yaml": {**VPT_PROMPT, f"{M}.method.name": "vpt", f"{M}.method.preset": "paper_shallow"},
    "fgvc/vpt_deep.yaml": {  # KMnP/vpt configs/prompt/cub.yaml L1-12: BASE_LR 0.1, WEIGHT_DECAY 0.01 (train.py uses
        # BASE_LR as given); deep p = 10 for CUB (visinf/adapter_plus conf/experiment/fgvc/vpt.yaml)
        **VPT_PROMPT,
        f"{M}.lr": 0.1,
        f"{M}.weight_decay": 0.01,
        f"{M}.method": {"name": "vpt", "preset": "paper", "length": 10},
    },
    "fgvc/vpt_shallow.yaml": {
        **VPT_PROMPT,
        f"{M}.lr": 0.1,
        f"{M}.weight_decay": 0.01,
        f"{M}.method.preset": "paper_shallow",
    },  # fmt: skip
    "vtab/mosa.yaml": {  # Theia-4869/MoSA scripts/mosa/vit/VTAB/*.sh: bottleneck 16, lr 5e-3, N 4, share down
        **MOSA,
        f"{M}.lr": 5e-3,
        f"{M}.method": {"name": "mosa", "preset": "paper"},
    },
    "fgvc/mosa.yaml": {  # Theia-4869/MoSA scripts/mosa/vit/FGVC/cub.sh: bottleneck 64, lr 1e-3, N 4, share down
        **MOSA,
        f"{M}.lr": 1e-3,
        f"{M}.method": {"name": "mosa", "preset": "paper_fgvc"},
    },
    "vtab/full.yaml": {  # KMnP/vpt full baseline: AdamW with its fixed wd 0.01 (src/solver/optimizer.py L36-50)
        **VIT_DROPOUT,
        f"{M}.optimizer": "adamw",
        f"{M}.weight_decay": 0.01,
        f"{M}.method": "full",
    },
    "fgvc/full.yaml": {**VIT_DROPOUT, f"{M}.optimizer": "adamw", f"{M}.weight_decay": 0.01, f"{M}.method": "full"},
    "diffusion/difffit_dit.yaml": {  # DiffFit (arXiv 2304.06648): lr 10x DiT's pretraining one (facebookresearch/DiT
        # train.py: AdamW lr 1e-4, weight_decay 0), the rule the paper states (quoted in mkshing/DiffFit-pytorch README)
        f"{M}.method": {"name": "difffit", "preset": "paper"},
        f"{M}.optimizer": "adamw",
        f"{M}.lr": 1e-3,
        f"{M}.weight_decay": 0.0,
    },
    "diffusion/difffit.yaml": {  # mkshing/DiffFit-pytorch's SD default: lr 1e-3, constant (no warmup)
        f"{M}.method": {"name": "difffit", "preset": "sd"},
        f"{M}.lr": 1e-3,
        f"{M}.warmup_epochs": 0,
    },
    "clip/lora.yaml": {  # MaxZanella/CLIP-LoRA run_utils.py L17-45 (--r 2 --alpha 1 --dropout_rate 0.25 --params
        # q k v --encoder both --lr 2e-4 --batch_size 32 --n_iters 500 --shots 16); loralib/layers.py L40-42
        # (scaling alpha / sqrt(r)); lora.py L73-76 (AdamW wd 1e-2, CosineAnnealingLR eta_min 1e-6 over
        # n_iters x shots); main.py L38-43 (RandomResizedCrop 0.08-1 bicubic + flip); datasets: "a photo of a {}."
        f"{M}.method": {"name": "lora", "r": 2, "alpha": 2**0.5, "dropout": 0.25, "targets": ["attn.qkv[q,k,v]"]},
        f"{M}.text_method": {
            "name": "lora",
            "r": 2,
            "alpha": 2**0.5,
            "dropout": 0.25,
            "targets": ["attn.qkv[q,k,v]"],
        },  # fmt: skip
        f"{M}.optimizer": "adamw",
        f"{M}.lr": 2e-4,
        f"{M}.weight_decay": 0.01,
        f"{M}.warmup_epochs": 0,
        f"{M}.min_lr": 1e-6,
        f"{M}.templates": ["a photo of a {}."],
        f"{M}.logit_scale": 100.0,
        f"{T}.max_steps": 8000,
        f"{D}.batch_size": 32,
        f"{D}.shots": 16,
        f"{D}.train_crop": "random_resized_crop",
        f"{D}.crop_scale": [0.08, 1.0],
        f"{D}.interpolation": "bicubic",
    },
}

POINT_MAE = {  # Pang-Yatian/Point-MAE cfgs/finetune_scan_hardest.yaml and finetune_modelnet.yaml: AdamW lr 5e-4,
    # wd 0.05; CosLR (timm CosineLRScheduler per epoch: t_initial 300, lr_min 1e-6, warmup_lr_init 1e-6, warmup_t 10);
    # total_bs 32, grad_norm_clip 10; model: trans_dim 384, depth 12, drop_path_rate 0.1, group_size 32
    f"{M}.optimizer": "adamw",
    f"{M}.lr": 5e-4,
    f"{M}.weight_decay": 0.05,
    f"{M}.schedule": "timm_cosine",
    f"{M}.warmup_epochs": 10,
    f"{M}.warmup_lr": 1e-6,
    f"{M}.min_lr": 1e-6,
    f"{T}.max_epochs": 300,
    f"{T}.gradient_clip_val": 10,
    f"{D}.batch_size": 32,
    f"{B}.drop_path_rate": 0.1,
    f"{B}.group_size": 32,
    f"{D}.augment": "scale_translate",  # datasets/data_transforms.py PointcloudScaleAndTranslate
}
POINT_METHODS = ("full", "linear", "bitfit", "lora", "adapter", "vpt_deep", "ssf", "mosa", "vl_pet")
RECIPES |= {
    f"point/scanobjectnn/{m}.yaml": {**POINT_MAE, f"{D}.num_points": 2048, f"{B}.num_points": 2048,
                                     f"{B}.num_group": 128}  # finetune_scan_hardest.yaml: npoints 2048, num_group 128
    for m in POINT_METHODS
} | {
    f"point/modelnet40/{m}.yaml": {**POINT_MAE, f"{D}.num_points": 1024, f"{B}.num_points": 1024,
                                   f"{B}.num_group": 64}  # finetune_modelnet.yaml: npoints 1024, num_group 64
    for m in POINT_METHODS
}  # fmt: skip

ANY2POINT = {  # Ivan-Tang-3D/Any2Point cfgs/scanobjectnn/Any2Point.yaml (lr 5e-4, adamw wd 0.05, cosine 300 epochs,
    # warmup 10, min_lr 1e-6, grad_norm_clip 10) and the MN40 folders' cfgs/finetune_modelnet.yaml (the same, CosLR)
    f"{M}.optimizer": "adamw",
    f"{M}.lr": 5e-4,
    f"{M}.weight_decay": 0.05,
    f"{M}.warmup_epochs": 10,
    f"{M}.min_lr": 1e-6,
    f"{T}.max_epochs": 300,
    f"{T}.gradient_clip_val": 10,
    f"{D}.batch_size": 32,
    f"{D}.num_points": 1024,
    f"{B}.num_points": 1024,
}
ANY2POINT_METHOD = "model.init_args.method"
RECIPES |= {
    # Any2Point_DINOV2_Vision/fine_tune.sh: --trans=-1.8 --patchknn 64 --coef_pro 0.7 --coef_2dgird 26
    # --scale_factor 0.3 --coef_3dgird 0.16 --attn2d_dim 12; cfg adapter_dim 8, attn_drop_rate 0.1
    "point/scanobjectnn/any2point_dinov2.yaml": {
        **ANY2POINT, f"{B}.source": "vit_base_patch14_dinov2", f"{B}.k": 64, f"{B}.shift": -1.8, f"{B}.attn_drop": 0.1,
        f"{B}.normalize": "scan", f"{D}.augment": "rotate", f"{D}.normalize": "center",
        ANY2POINT_METHOD: {"name": "any2point", "preset": "paper", "r": 8, "scale": 0.3, "ensemble": 0.7,
                           "voxel": 0.16, "cell_2d": 26},
    },
    # Any2Point_CLIP_Lang/fine_tune.sh: --pos_cor -1 0 1 --coef_pro 0.3 --coef_1dgird 2 --coef_3dgird 0.08
    # --scale_factor 0.3 --attn1d_dim 12; cfg adapter_dim 16; Point_PN_scan k_neighbors 81
    "point/scanobjectnn/any2point_clip_text.yaml": {
        **ANY2POINT, f"{B}.k": 81, f"{B}.direction": [-1.0, 0.0, 1.0], f"{B}.normalize": "scan",
        f"{D}.augment": "rotate", f"{D}.normalize": "center",
        ANY2POINT_METHOD: {"name": "any2point", "preset": "paper", "r": 16, "scale": 0.3, "ensemble": 0.3,
                           "voxel": 0.08, "cell_1d": 2},
    },
    # Any2Point_DINOV2_modelnet/fine_tune.sh: --coef_pro 0.1 --scale_factor 1.0 --coef_2dgird 26 --coef_3dgird 0.16
    # --adapter_dim 8 --patchknn 81 --trans=-1.4; cfg drop_path_rate 0.1; Point_PN type 'mn40'
    "point/modelnet40/any2point_dinov2.yaml": {
        **ANY2POINT, f"{B}.k": 81, f"{B}.shift": -1.4, f"{B}.normalize": "mn40",
        f"{B}.source_options": {"drop_path_rate": 0.1},
        ANY2POINT_METHOD: {"name": "any2point", "preset": "paper", "r": 8, "scale": 1.0, "ensemble": 0.1,
                           "voxel": 0.16, "cell_2d": 26},
    },
    # Any2Point_clip_lang_modelnet/fine_tune.sh: --coef_pro 0.5 --scale_factor 0.3 --coef_1dgird 2 --coef_3dgird 0.16
    # --adapter_dim 16 --patchknn 64 --pos_cor 1 -1 0
    "point/modelnet40/any2point_clip_text.yaml": {
        **ANY2POINT, f"{B}.k": 64, f"{B}.direction": [1.0, -1.0, 0.0], f"{B}.normalize": "mn40",
        ANY2POINT_METHOD: {"name": "any2point", "preset": "paper", "r": 16, "scale": 0.3, "ensemble": 0.5,
                           "voxel": 0.16, "cell_1d": 2},
    },
}  # fmt: skip

# The head each method's `paper` preset initialises, as the official code does.
VPT_HEAD = "kaiming_normal_fan_out;bias=-4.59511985013459"  # KMnP/vpt src/models/mlp.py L53-57: -log(0.99 / 0.01)
HEAD_INITS = {
    "vpt": VPT_HEAD,  # vit_models.py L159-165: MLP(..., special_bias=True) for every transfer type
    "linear": VPT_HEAD,
    "full": VPT_HEAD,
    "bitfit": VPT_HEAD,
    "mosa": VPT_HEAD,  # Theia-4869/MoSA src/models/vit_models.py L132-138, mlp.py L52-57
    "ssf": "trunc_normal:0.02",  # dongzelian/SSF models/vision_transformer.py L472, L550-555 (init_weights_vit_timm)
    "lora": "trunc_normal:0.02",  # NOAH supernet_vision_transformer_timm.py L551-555 (reset_classifier)
    "adapter": "trunc_normal:0.01",  # ShoufaChen/AdaptFormer main_image.py L226-227 (as MoCo v3)
}
