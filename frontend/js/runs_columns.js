// The runs table's columns: the fixed ones, an extra column per RunSpec field or summary
// figure (cols=momentum,s.best_val_err in the URL), their sort order, and the search rule.

import { derivedOf, num, pct, where } from './format.js';

// Summary figures offered as columns before any run has one (trainer/metrics.py SUMMARY_KEYS).
export const SUMMARY_KEYS = [
  'final_val_err', 'best_val_err', 'median_last5_val_err', 'final_train_err', 'final_val_loss',
  'time_to_target_s', 'iters_to_target', 'epochs_to_target', 'loss_oscillation', 'samples_per_s',
  'wall_time_s',
];

// The fixed columns: id, header, title, numeric, sort value of a run.
export const BASE_COLUMNS = [
  { id: 'id', label: 'id', num: true, value: (r) => r.id },
  { id: 'name', label: 'name', value: (r) => (r.name || '').toLowerCase() },
  { id: 'status', label: 'status', value: (r) => r.status },
  { id: 'progress', label: 'progress', value: (r) => r.progress ?? (r.status === 'succeeded' ? 1 : 0) },
  { id: 'k', label: 'k', title: 'workers', num: true, value: (r) => r.spec?.workers },
  { id: 'n', label: 'n', title: 'batch per worker', num: true, value: (r) => r.spec?.batch_per_worker },
  { id: 'kn', label: 'k·n', title: 'total batch', num: true, value: (r) => derivedOf(r).kn },
  { id: 'lr', label: 'peak LR', title: 'peak learning rate', num: true, value: (r) => derivedOf(r).peak },
  { id: 'warmup', label: 'warmup', value: (r) => r.spec?.warmup },
  { id: 'norm', label: 'norm', value: (r) => r.spec?.norm },
  { id: 'err', label: 'val err', title: 'final validation error', num: true, value: (r) => r.summary?.final_val_err },
];
export const TAIL_COLUMNS = [
  { id: 'group', label: 'group', value: (r) => r.group_id },
  { id: 'where', label: 'where', value: (r) => where(r) },
  { id: 'created', label: 'created', value: (r) => r.created_at },
];

/** An extra column: "momentum" (a RunSpec field) or "s.best_val_err" (a summary figure). */
export function extraColumn(id) {
  if (id.startsWith('s.')) {
    const key = id.slice(2);
    return { id, label: key, title: `summary: ${key}`, num: true, extra: true, value: (r) => r.summary?.[key] };
  }
  return { id, label: id, title: `spec: ${id}`, extra: true, value: (r) => r.spec?.[id] };
}

/** Text of an extra column's cell: errors as %, lists joined, numbers short. */
export function cellText(col, run) {
  const v = col.value(run);
  if (v == null) return '';
  if (col.id.startsWith('s.') && col.id.endsWith('_err')) return pct(v);
  if (Array.isArray(v)) return v.join(', ');
  if (typeof v === 'number') return num(v, 4);
  return String(v);
}

const isEmpty = (v) => v == null || v === '' || (typeof v === 'number' && !Number.isFinite(v));

/** Compare two non-empty sort values: numbers numerically, text alphabetically. */
export function compareValues(a, b) {
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return String(Array.isArray(a) ? a.join(',') : a).localeCompare(String(Array.isArray(b) ? b.join(',') : b), undefined, { numeric: true });
}

/** Does a run match the search text (name, tags and notes, as GET /api/runs?q= does)? */
export function matches(run, q) {
  const needle = q.trim().toLowerCase();
  if (!needle) return true;
  const hay = [run.name ?? '', ...(run.tags || []), run.notes ?? ''].join('\n').toLowerCase();
  return hay.includes(needle);
}

/** Runs in the order of `sort` ("kn" ascending, "-kn" descending, "" the server's). */
export function sortBy(runs, sort, columns) {
  if (!sort) return runs; // the server's order: newest first
  const desc = sort.startsWith('-');
  const col = columns.find((c) => c.id === (desc ? sort.slice(1) : sort));
  if (!col) return runs;
  return [...runs].sort((a, b) => {
    const [va, vb] = [col.value(a), col.value(b)];
    // Empty values stay last either way; ties keep newest first.
    if (isEmpty(va) || isEmpty(vb)) return isEmpty(va) - isEmpty(vb) || b.id - a.id;
    const c = compareValues(va, vb);
    return (desc ? -c : c) || b.id - a.id;
  });
}
