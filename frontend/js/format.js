// Number and label formatting shared by the views.

/** Total batch as the paper writes it: 256, 1k, 8k, 1.5k (k = 1024). */
export function formatKn(kn) {
  if (kn == null || !Number.isFinite(kn)) return '–';
  if (kn >= 1024 && kn % 512 === 0) return `${kn / 1024}k`;
  return String(kn);
}

/** A number with up to `digits` significant digits, no trailing zeros (3.2, 0.0125). */
export function num(x, digits = 3) {
  if (x == null || x === '') return '–';
  if (!Number.isFinite(x)) return String(x);
  if (x === 0) return '0';
  const abs = Math.abs(x);
  if (abs >= 1e6 || abs < 1e-4) return x.toExponential(Math.max(0, digits - 1));
  return String(Number(x.toPrecision(digits)));
}

/** An error fraction in [0, 1] as percent ("12.34%"). */
export function pct(fraction, digits = 2) {
  if (fraction == null || !Number.isFinite(fraction)) return '–';
  return `${(100 * fraction).toFixed(digits)}%`;
}

/** Seconds as "42 s", "3 m 05 s", "2 h 07 m". */
export function duration(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return '–';
  const s = Math.round(seconds);
  if (seconds < 59.5) return `${num(seconds, seconds < 10 ? 2 : 3)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${String(s % 60).padStart(2, '0')} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} m`;
}

/** "2026-11-23T10:00:00Z" as local "11-23 10:00" (full date in the title). */
export function shortTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const p = (n) => String(n).padStart(2, '0');
  return `${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

export const WARMUP_LABEL = { none: 'no warmup', constant: 'constant', gradual: 'gradual' };

/** Where a run ran: "box / gpu 0,1", "box / cpu". */
export function where(run) {
  if (!run.host) return '';
  return `${run.host} / ${run.gpus ? `gpu ${run.gpus}` : 'cpu'}`;
}

/**
 * total batch, peak LR, samples per logged step (`perStep`: kn/m with backward_splits m)
 * of a run, from `derived` or computed from the spec.
 */
export function derivedOf(run) {
  const spec = run.spec || {};
  const d = run.derived || {};
  const kn = d.total_batch ?? (spec.workers ?? 1) * (spec.batch_per_worker ?? 32);
  let peak = d.peak_lr;
  if (peak == null && spec.base_lr != null) {
    const ratio = kn / (spec.ref_batch ?? 256);
    peak =
      spec.scaling === 'none'
        ? spec.base_lr
        : spec.scaling === 'sqrt'
          ? spec.base_lr * Math.sqrt(ratio)
          : spec.base_lr * ratio;
  }
  const perStep = d.update_batch ?? kn / (spec.backward_splits ?? 1);
  return { kn, peak, perStep, ipe: d.iters_per_epoch, total: d.total_iters };
}

/** The paper's legend: "kn=8k, η=3.2, gradual". */
export function paperLabel(run) {
  const { kn, peak } = derivedOf(run);
  const warm = WARMUP_LABEL[run.spec?.warmup] ?? run.spec?.warmup ?? '';
  return `kn=${formatKn(kn)}, η=${num(peak)}${warm ? `, ${warm}` : ''}`;
}

// The run statuses of core/status.py (RunStatus, FINAL_STATUSES); tests/test_status.py
// fails when the two lists differ.
export const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'diverged', 'cancelled'];
export const TERMINAL = new Set(['succeeded', 'failed', 'diverged', 'cancelled']);
// By name, for the views: STATUS.QUEUED === 'queued'.
export const STATUS = Object.freeze(Object.fromEntries(STATUSES.map((s) => [s.toUpperCase(), s])));
