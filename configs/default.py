"""The README's main job: portraits + CCP on a CPU laptop in well under an hour, a useful model."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Default configuration; every other config starts from this one."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_devices = 0  # 0 = every device of every process

    c.data = ml_collections.ConfigDict()
    # name:weight pairs; each training batch holds examples in these proportions, rounded to
    # whole examples (at least one each; training warns where the batch cannot hold them exactly).
    c.data.train = "portrait_segmentation:1,ccp_person:1"
    c.data.train_split = "train"
    c.data.eval = "portrait_segmentation,ccp_person"
    c.data.eval_split = "validation"
    c.data.image_size = 128
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.folder = ""  # a person_folder dataset's root, when used
    c.data.num_workers = 2  # decoding/augmentation threads per process
    c.data.prefetch = 2  # batches prepared ahead, on device

    c.data.aug = ml_collections.ConfigDict()
    c.data.aug.enabled = True  # False turns every augmentation below off, copy-paste too
    c.data.aug.scale_min = 0.75  # zoom range of the random scale-and-crop
    c.data.aug.scale_max = 1.25
    c.data.aug.max_shift = 0.1  # fraction of the image size
    c.data.aug.rotate_degrees = 10.0
    c.data.aug.hflip = True
    c.data.aug.brightness = 0.2
    c.data.aug.contrast = 0.2
    c.data.aug.saturation = 0.2
    # Probability that a training example gets another batch example's person pasted over it
    # (jaxseg.device_augment.copy_paste, applied in the train step on the device).
    c.data.aug.copy_paste = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.depth = 4
    c.model.base_features = 16
    c.model.norm = "batch"
    c.model.residual = False
    c.model.dropout = 0.1
    c.model.upsample = "transpose"
    c.model.num_classes = 1
    c.model.attention_gates = False  # gate each skip connection by the decoder (Attention U-Net)
    # (dy, dx) model pixels by which a trained model's output lies below/right of its input, put
    # back out of training: (0, 0) for models trained since masks are resized at pixel centres.
    c.model.output_shift = (0.0, 0.0)
    c.model.compute_dtype = "float32"

    c.loss = ml_collections.ConfigDict()
    c.loss.ce_weight = 1.0
    c.loss.dice_weight = 1.0
    c.loss.boundary_weight = 0.0  # extra cross-entropy weight of pixels near the mask's edge
    c.loss.boundary_radius = 2  # that band's half-width, in model pixels
    c.loss.lovasz_weight = 0.0  # weight of the Lovász hinge, a surrogate of 1 - IoU per image

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.final_lr_fraction = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.step_fractions = (0.6, 0.85)
    c.optim.step_decay = 0.1
    c.optim.grad_clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16  # global, over all devices and processes
    c.train.num_steps = 2400
    c.train.log_every = 50
    c.train.eval_every = 600
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.num_logged_images = 4
    c.train.ema_decay = 0.0  # > 0 keeps and evaluates an exponential moving average of the weights
    c.train.init_checkpoint = ""  # used only when the workdir has no checkpoint yet

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_examples = 0  # validation during training: first N of each split (0 = all)
    c.eval.threshold = 0.5
    c.eval.flip_tta = False  # validation predicts with the mirrored image averaged in
    c.eval.refine = False  # validation upsamples along the photo's edges (jaxseg.refine)
    c.lock()  # unknown fields (typos in overrides) are errors, not silent additions
    return c
