// Curve smoothing and seed aggregation (pure functions, unit-tested from Python).

/**
 * TensorBoard's debiased exponential moving average.
 *   last = s * last + (1 - s) * v;   smoothed = last / (1 - s^t)
 * where t counts the finite values seen so far, so the first points are not pulled
 * towards 0. Non-finite values pass through untouched and do not advance t; a constant
 * series is returned unchanged (as TensorBoard does, to avoid float noise on flat lines).
 */
export function debiasedEma(values, s) {
  const out = new Array(values.length);
  if (!(s > 0)) {
    for (let i = 0; i < values.length; i++) out[i] = values[i];
    return out;
  }
  const first = values[0];
  const constant = values.every((v) => v === first);
  let last = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (constant || !Number.isFinite(v)) {
      out[i] = v;
      continue;
    }
    last = last * s + (1 - s) * v;
    count += 1;
    out[i] = s === 1 ? last : last / (1 - s ** count);
  }
  return out;
}

/**
 * Linear interpolation of (xs, ys) at x (xs increasing), as numpy.interp; null outside
 * [xs[0], xs[-1]] and next to a gap (null).
 */
function interpAt(xs, ys, x, hint) {
  const n = xs.length;
  if (n === 0 || x < xs[0] || x > xs[n - 1]) return { y: null, hint };
  let j = hint;
  while (j < n - 1 && xs[j + 1] <= x) j++;
  if (xs[j] === x || j === n - 1) return { y: ys[j], hint: j };
  const x0 = xs[j];
  const x1 = xs[j + 1];
  const t = x1 === x0 ? 0 : (x - x0) / (x1 - x0);
  if (ys[j] == null || ys[j + 1] == null) return { y: null, hint: j };
  return { y: ys[j] + t * (ys[j + 1] - ys[j]), hint: j };
}

/**
 * Mean and band of several curves of one configuration (runs that differ only in seed).
 * Curves are [{x, y}] with increasing x; they are interpolated onto the densest curve's
 * x grid, limited to the range all of them cover. band: "minmax" or "std" (mean ± 1 std).
 * Returns {x, mean, lo, hi}.
 */
export function aggregate(curves, band = 'minmax') {
  const usable = curves.filter((c) => c.x.length > 0);
  if (usable.length === 0) return { x: [], mean: [], lo: [], hi: [] };
  const start = Math.max(...usable.map((c) => c.x[0]));
  const end = Math.min(...usable.map((c) => c.x[c.x.length - 1]));
  const densest = usable.reduce((a, b) => (b.x.length > a.x.length ? b : a));
  const grid = densest.x.filter((x) => x >= start && x <= end);
  const hints = usable.map(() => 0);
  const out = { x: [], mean: [], lo: [], hi: [] };
  for (const x of grid) {
    const ys = [];
    usable.forEach((c, i) => {
      const r = interpAt(c.x, c.y, x, hints[i]);
      hints[i] = r.hint;
      if (r.y != null && Number.isFinite(r.y)) ys.push(r.y);
    });
    if (ys.length === 0) continue;
    const mean = ys.reduce((a, b) => a + b, 0) / ys.length;
    let lo;
    let hi;
    if (band === 'std') {
      const variance = ys.reduce((a, b) => a + (b - mean) ** 2, 0) / ys.length;
      const sd = Math.sqrt(variance);
      lo = mean - sd;
      hi = mean + sd;
    } else {
      lo = Math.min(...ys);
      hi = Math.max(...ys);
    }
    out.x.push(x);
    out.mean.push(mean);
    out.lo.push(lo);
    out.hi.push(hi);
  }
  return out;
}

/** Mean and population standard deviation of finite numbers (null when none). */
export function meanStd(values) {
  const v = values.filter((x) => x != null && Number.isFinite(x));
  if (v.length === 0) return { mean: null, std: null, n: 0 };
  const mean = v.reduce((a, b) => a + b, 0) / v.length;
  const std = Math.sqrt(v.reduce((a, b) => a + (b - mean) ** 2, 0) / v.length);
  return { mean, std, n: v.length };
}
