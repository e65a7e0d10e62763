// The RunSpec form: every field of trainer/spec.py with its default, kind and limits.
// Kept by hand for labels and grouping; tests/browser/test_newrun.py checks it against
// RunSpec.model_json_schema() (names, defaults, choices, nullability), so drift fails CI.
//
// kind: select (Literal) | int | float | bool | text | floats (comma-separated list).
// nullable: empty input means null ("the dataset's default", "no micro-batching").

export const GROUPS = [
  ['data', 'Data & model'],
  ['batch', 'Minibatch: k workers × n'],
  ['lr', 'Learning rate'],
  ['opt', 'Optimizer'],
  ['norm', 'Normalization'],
  ['loop', 'Loop'],
  ['probe', 'Measurements (batch-size advisor)'],
];

export const FIELDS = [
  // --- data ---
  { name: 'model', group: 'data', kind: 'select', default: 'mnist1d_cnn',
    options: ['mlp', 'mnist1d_cnn', 'simple_cnn', 'resnet20', 'resnet50'],
    help: 'Network architecture.' },
  { name: 'dataset', group: 'data', kind: 'select', default: 'mnist1d',
    options: ['mnist1d', 'synthetic', 'mnist', 'cifar10', 'imagefolder'],
    help: 'Training data.' },
  { name: 'dataset_size', group: 'data', kind: 'int', default: null, nullable: true, min: 1,
    placeholder: 'dataset default', help: 'Samples to use (MNIST-1D: 5000, 80% train).' },
  { name: 'data_root', group: 'data', kind: 'text', default: null, nullable: true,
    placeholder: 'folder (mnist, cifar10, imagefolder)', help: 'Local dataset folder.' },
  { name: 'epochs', group: 'data', kind: 'int', default: 20, min: 1, max: 10000,
    help: 'Training epochs (paper: 90).' },
  // --- minibatch ---
  { name: 'workers', label: 'workers k', group: 'batch', kind: 'int', default: 1, min: 1,
    max: 4096, help: 'k: workers (virtual or real).' },
  { name: 'batch_per_worker', label: 'batch per worker n', group: 'batch', kind: 'int',
    default: 32, min: 1, max: 65536, help: 'n: samples per worker per iteration (paper: 32).' },
  { name: 'nproc', group: 'batch', kind: 'int', default: 1, min: 1, max: 512,
    help: 'Real DDP processes per node the k workers are spread over.' },
  { name: 'nodes', group: 'batch', kind: 'int', default: 1, min: 1, max: 64,
    help: 'Machines the run spans (a gang of workers, nproc processes each); nodes × nproc must divide k.' },
  { name: 'micro_batch', group: 'batch', kind: 'int', default: null, nullable: true, min: 1,
    placeholder: 'whole iteration', help: 'Largest forward pass; bigger iterations accumulate.' },
  { name: 'backward_splits', label: 'backward splits m', group: 'batch', kind: 'int', default: 1,
    min: 1, max: 64, help: 'Seed 004: one forward, m updates from m chunks (1: plain).' },
  // --- learning rate ---
  { name: 'base_lr', label: 'base LR η', group: 'lr', kind: 'float', default: 0.1, step: 'any',
    help: 'η for the reference batch (paper: 0.1 per 256).' },
  { name: 'ref_batch', group: 'lr', kind: 'int', default: 256, min: 1,
    help: 'Reference total batch of base LR.' },
  { name: 'scaling', group: 'lr', kind: 'select', default: 'linear',
    options: ['linear', 'sqrt', 'none'], help: 'How the LR grows with kn / ref_batch.' },
  { name: 'warmup', group: 'lr', kind: 'select', default: 'gradual',
    options: ['none', 'constant', 'gradual'], help: 'Warmup strategy (paper: gradual).' },
  { name: 'warmup_epochs', group: 'lr', kind: 'float', default: 5.0, min: 0, step: 'any',
    help: 'Warmup length in epochs (paper: 5).' },
  { name: 'decay', group: 'lr', kind: 'select', default: 'step',
    options: ['step', 'cosine', 'constant'], help: 'Schedule after warmup.' },
  { name: 'milestones', group: 'lr', kind: 'floats', default: [6.67, 13.33, 17.78],
    help: 'Epochs of step decay, each < epochs (paper: 30, 60, 80 of 90).' },
  { name: 'decay_factor', group: 'lr', kind: 'float', default: 0.1, step: 'any',
    help: 'LR multiplier at each milestone.' },
  // --- optimizer ---
  { name: 'optimizer', group: 'opt', kind: 'select', default: 'sgd',
    options: ['sgd', 'lars', 'lamb'], help: 'Update rule.' },
  { name: 'momentum', group: 'opt', kind: 'float', default: 0.9, min: 0, step: 'any',
    help: 'Momentum m (paper: 0.9).' },
  { name: 'nesterov', group: 'opt', kind: 'bool', default: false, help: 'Nesterov momentum.' },
  { name: 'momentum_form', group: 'opt', kind: 'select', default: 'pytorch',
    options: ['pytorch', 'caffe'], help: 'pytorch: LR outside the buffer; caffe: inside.' },
  { name: 'momentum_correction', group: 'opt', kind: 'bool', default: true,
    help: 'Caffe form: rescale the buffer by lr_{t+1}/lr_t (Remark 2).' },
  { name: 'weight_decay', group: 'opt', kind: 'float', default: 0.0001, min: 0, step: 'any',
    help: 'λ (paper: 1e-4).' },
  { name: 'weight_decay_norm', group: 'opt', kind: 'bool', default: false,
    help: 'Also decay norm γ/β and biases (paper: no).' },
  // --- normalization ---
  { name: 'norm', group: 'norm', kind: 'select', default: 'bn_local',
    options: ['bn_local', 'bn_sync', 'bn_ghost', 'frn', 'cbn', 'gn', 'none'],
    help: 'bn_local: per-worker BN over n (the paper).' },
  { name: 'ghost_batch', group: 'norm', kind: 'int', default: null, nullable: true, min: 1,
    placeholder: 'bn_ghost only', help: 'Group size g of bn_ghost.' },
  { name: 'bn_momentum', group: 'norm', kind: 'float', default: 0.1, step: 'any',
    help: 'Running-stat update weight (PyTorch convention).' },
  { name: 'cbn_window', group: 'norm', kind: 'int', default: 4, min: 1, max: 16,
    help: 'Iterations averaged by cbn.' },
  { name: 'gn_groups', group: 'norm', kind: 'int', default: 8, min: 1, help: 'Groups of gn.' },
  { name: 'zero_init_residual', group: 'norm', kind: 'bool', default: true,
    help: 'Last BN γ of each residual block starts at 0.' },
  // --- loop ---
  { name: 'eval_every', group: 'loop', kind: 'int', default: 1, min: 1,
    help: 'Validate every this many epochs.' },
  { name: 'seed', group: 'loop', kind: 'int', default: 0, min: 0, help: 'Random seed.' },
  { name: 'device', group: 'loop', kind: 'select', default: 'auto',
    options: ['auto', 'cpu', 'cuda'], help: 'Where to train.' },
  { name: 'precision', group: 'loop', kind: 'select', default: 'fp32',
    options: ['fp32', 'bf16'], help: 'Compute precision.' },
  { name: 'compile', group: 'loop', kind: 'bool', default: false,
    help: 'torch.compile the model (slower start, faster steps).' },
  { name: 'target_accuracy', group: 'loop', kind: 'float', default: null, nullable: true,
    step: 'any', placeholder: 'e.g. 0.9', help: 'Validation accuracy whose first reach is timed.' },
  { name: 'divergence_factor', group: 'loop', kind: 'float', default: 20.0, step: 'any',
    help: 'Diverged when loss exceeds this × its start.' },
  { name: 'checkpoint', group: 'loop', kind: 'bool', default: true,
    help: 'Checkpoint each epoch (resume after a crash).' },
  // --- measurements (issue 13) ---
  { name: 'noise_every', group: 'probe', kind: 'int', default: 40, min: 0,
    help: 'Iterations between gradient-noise-scale measurements (0: off).' },
  { name: 'health_every', group: 'probe', kind: 'int', default: 20, min: 0,
    help: 'Iterations between layer-health measurements: dead ReLUs, norms (0: off).' },
];

export const FIELD_BY_NAME = Object.fromEntries(FIELDS.map((f) => [f.name, f]));

/** A fresh copy of the default spec. */
export function defaultSpec() {
  return Object.fromEntries(
    FIELDS.map((f) => [f.name, Array.isArray(f.default) ? [...f.default] : f.default]),
  );
}
