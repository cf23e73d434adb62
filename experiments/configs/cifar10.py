r"""Default: fine-tune a CIFAR ResNet-18 on CIFAR-10 with the stem and stage1 frozen.

Run (CIFAR-10 is downloaded and prepared by TFDS on first use; needs the
`cifar` extra, see the README):

  python experiments/cifar.py --freeze=stage1,stage2

Offline smoke test on the synthetic dataset (same pipeline, CIFAR shapes):

  python experiments/cifar.py --config.dataset=synthetic --config.num_epochs=2

Start from a source model pretrained with `experiments/configs/cifar100_source.py`:

  python experiments/cifar.py --config.init_from=runs/cifar100_source

Result (synthetic, 2 epochs, 2 CPU cores): the training loss falls from about
2.3 to below 0.5 and the test accuracy ends above 0.9.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.dataset = "cifar10"  # cifar10 | cifar100 | synthetic
    config.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    config.download = True  # let TFDS download and prepare CIFAR (needs the `cifar` extra)
    config.synthetic_train_size = 5000
    config.synthetic_test_size = 1000
    config.synthetic_num_classes = 10
    config.augment = True  # random crop (pad 4) + horizontal flip, on device

    # Model.
    config.model = "resnet18"  # resnet10 | resnet18 | resnet34 | resnet50 | vit_ti4 | vit_s4 | ...
    # ResNets only:
    config.stem = "cifar"  # cifar (3x3, no max-pool) | imagenet (7x7 + max-pool)
    config.width = 64  # base channels (64 = the standard ResNet)
    config.head = "linear"  # linear | mlp (a ViT's head is linear)
    config.head_hidden = 512
    config.head_dropout = 0.5
    # ViTs only (experiments/configs/vit_cifar100_source.py): 0 keeps the size's default.
    config.pool = "tok"  # tok (class token) | gap (mean of the tokens)
    config.scan = False  # stack the blocks with nn.scan (Transformer/encoderblock)
    config.vit_width = 0
    config.vit_depth = 0
    config.vit_mlp_dim = 0
    config.vit_heads = 0
    config.dtype = "float32"  # float32 | bfloat16 (compute; params stay float32)

    # Freezing.
    config.freeze = "stem,stage1"  # a freeze spec: 'stage1,stage2', 'none', 'all-but:head', ...
    config.schedule = ""  # an unfreezing schedule, e.g. 'gradual'; overrides `freeze`
    config.freeze_method = "zero"  # zero | lr0
    config.train_bn = False  # keep BatchNorm training inside frozen stages (fastai)
    # Store frozen parameters in '' (off: float32) | 'bfloat16' | 'float16': half the bytes;
    # an unfrozen layer trains on from the rounded values. Method zero only.
    config.frozen_dtype = ""
    # '' | 'ulmfit' | 'ulmfit:2.6' | 'geometric:1e-2' (stem/head ratio) | 'stem=0.1,stage1=0.3'
    config.lr_multipliers = ""
    # Layer-wise decay (BEiT/MAE, timm's layer_decay) in (0, 1], 0 = off: the last layer
    # at the base rate, each one below `layer_decay` times slower; a ViT's embeddings are
    # its first layer, its final norm and head its last. Not with lr_multipliers.
    config.layer_decay = 0.0
    config.cache_frozen_features = False
    # Automatic freezing for speed, config.schedule = 'auto' | 'freezeout': `freeze` is
    # then a fixed freeze of whole groups for the whole run ('none' to leave all to the
    # policy), and the policy freezes more groups, front first, never the head.
    config.auto = ml_collections.ConfigDict()
    config.auto.groups = ""  # groups the policy may freeze; "": all but the head and `freeze`
    config.auto.interval = 50  # 'auto': steps between decisions (the first after two)
    # 'auto': freeze when the gradient-norm change rate is below this percentile (0, 100)
    # of every trainable group's rate (AutoFreeze)
    config.auto.percentile = 50.0
    config.freezeout = ml_collections.ConfigDict()
    config.freezeout.t0 = 0.5  # the first group stops at this fraction of the run, (0, 1]
    config.freezeout.scaling = "cubic"  # linear | squared | cubic: later groups' stop times

    # Optimisation.
    config.optimizer = "adamw"  # adamw | sgd
    config.learning_rate = 1e-3
    config.momentum = 0.9  # sgd only
    config.weight_decay = 5e-4
    config.warmup_steps = 100  # at most a tenth of the run
    config.clip_norm = 1.0  # 0 = no clipping
    config.allow_nonfinite = False  # True: keep training through a NaN/inf loss or gradient
    config.batch_size = 128
    config.num_epochs = 10.0  # unless the schedule fixes the length (fine_tune)
    config.num_train_steps = -1  # > 0 overrides num_epochs

    # Devices. The mesh's axis sizes, data and fsdp, e.g. 'data=2,fsdp=2' (-1: the rest);
    # '' = every device on data. On several processes (--distributed) it spans all of
    # their devices; the batch is split over both axes.
    config.mesh = ""
    config.sharding = ""  # '' (state replicated) | 'fsdp' | 'fsdp:<min size>' (split on fsdp)

    # Init, checkpoints and logging.

    # Workdir of another run, a torchvision .pth/.safetensors file (ResNets) or a
    # big_vision .npz checkpoint (ViTs).
    config.init_from = ""
    # With init_from, what a checkpoint does with the layers that still equal the source
    # (frozen ones): 'reference' leaves them out, recording the source's name and content
    # hash (a resume with another source is refused) | 'copy' stores them too.
    config.checkpoint_source = "reference"
    config.checkpoint_every = 500
    config.keep_checkpoints = 3
    config.eval_every = 500
    config.log_every = 0  # steps between train rows; 0: about 50 rows per run
    config.progress = True
    # JAX's persistent compilation cache: a resumed run, or a rerun of the same
    # config, reads its compiled programs back; "" = off.
    config.compilation_cache = "~/.cache/layerfreeze/jax"
    # Compile the phases to come on a background thread while the current one
    # trains (`train.Phases(compile_ahead=True)`): a phase change then costs
    # about one step instead of a compilation. On CPU devices each program
    # compiled ahead also runs once on zeros (XLA:CPU's first run of a program
    # costs 2-5x a later one), with a second copy of the state while it runs.
    # Off on several processes (each would compile on its own timing), with a
    # logged note.
    config.compile_ahead = True
    config.plot = True
    config.seed = 0
    return config
