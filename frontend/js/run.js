// #/run/ID?x=step|epoch|samples|wall_time&smooth=0.6&logy=1 : one run, live.
// The history comes from /api/runs/ID/metrics; new points arrive over SSE
// (/api/runs/ID/stream, events `points` and `status`) and are appended with
// Plotly.extendTraces, at most once per animation frame. The log is polled from
// /api/runs/ID/log?after=SEQ while the run is live. Smoothing is the compare page's
// debiased EMA (smoothing.js), the raw curve faint beneath, as figure_spec.json says.

import { api, ApiError, qs, request } from './api.js';
import { h, replace, setText } from './escape.js';
import { derivedOf, duration, formatKn, num, pct, shortTime, STATUS, TERMINAL, where } from './format.js';
import {
  announceDrawn,
  axis,
  BASELINE_COLOR,
  baseLayout,
  colorAt,
  FIGURE,
  loadPlotly,
  PLOT_CONFIG,
  purge,
  withAlpha,
} from './plots.js';
import { go, href, replaceQuery } from './router.js';
import { debiasedEma } from './smoothing.js';
import { heatmapGrid, heatmapLayout, heatmapTrace, linkX, parseHealthKeys, readRunStat, rowsOf, STATS as HEALTH_STATS } from './health.js';
import { nodesTable } from './workers.js';

const HISTORY_POINTS = 2000;
// Past this many points per trace the history is re-read downsampled (memory, redraw cost).
const REDOWNSAMPLE_AT = 12000;
const STATUS_FALLBACK_MS = 5000;
const LOG_POLL_MS = 1000;
const LOG_TAIL = 1000;
const LOG_KEEP = 3000; // lines kept on the page
const X_MODES = ['step', 'epoch', 'samples', 'wall_time'];
const X_LABEL = { step: 'x: iteration', epoch: 'x: epoch', samples: 'x: samples', wall_time: 'x: wall time' };
const HEALTH_REFRESH_MS = 3000; // a live run's heatmap is re-read at most this often
const HEALTH_POINTS = 2000;
const MAX_CURSOR_CHARS = 6000; // the stream URL's cursors for keys the page does not plot

// Panels, in sections. `smooth`: the EMA applies (lines, not per-epoch markers);
// `logy`: the log-y toggle applies; `always`: drawn even before it has a point.
const PANELS = [
  { id: 'loss', section: 'training', title: 'loss', logy: true, always: true, traces: [
    { key: 'loss', name: 'training loss', color: colorAt(0), smooth: true },
    { key: 'val_loss', name: 'validation loss', color: BASELINE_COLOR, markers: true },
  ] },
  { id: 'err', section: 'training', title: 'error (%)', scale: 100, logy: true, always: true, traces: [
    { key: 'train_err', name: 'training error', color: colorAt(1), smooth: true },
    { key: 'val_err', name: 'validation error', color: BASELINE_COLOR, markers: true },
  ] },
  { id: 'lr', section: 'training', title: 'learning rate', tozero: true, always: true, traces: [
    { key: 'lr', name: 'learning rate', color: colorAt(3) },
  ] },
  { id: 'grad', section: 'training', title: 'gradient norm', tozero: true, logy: true, always: true, traces: [
    { key: 'grad_norm', name: 'gradient norm', color: colorAt(4), smooth: true },
  ] },
  // McCandlish et al.'s B_simple (trainer/noise.py), always on a log axis, with the run's
  // own kn across it (noiseExtras).
  { id: 'noise', section: 'training', title: 'Gradient noise scale', log: true, always: true, traces: [
    { key: 'noise_scale', name: 'noise scale B_simple', color: colorAt(5), smooth: true },
  ] },
  { id: 'step-time', section: 'timings', title: 'time per iteration (s)', tozero: true, logy: true, traces: [
    { key: 'step_time', name: 'step time', color: colorAt(2), smooth: true },
  ] },
  { id: 'throughput', section: 'timings', title: 'throughput (samples/s)', tozero: true, logy: true, traces: [
    // Derived here: total batch / step_time of each iteration.
    { key: 'samples_per_s', name: 'samples/s', color: colorAt(5), smooth: true, from: 'step_time' },
  ] },
  { id: 'epoch-time', section: 'timings', title: 'time per epoch (s)', tozero: true, logy: true, traces: [
    { key: 'epoch_time', name: 'epoch', color: BASELINE_COLOR, markers: true },
    { key: 'data_time', name: 'data', color: colorAt(6), markers: true },
    { key: 'compute_time', name: 'compute', color: colorAt(7), markers: true },
  ] },
  { id: 'sys-util', section: 'system', title: 'utilisation (%)', tozero: true, traces: [
    { key: 'sys/cpu_percent', name: 'CPU (100 = one core)', color: colorAt(0), smooth: true },
    { key: 'sys/gpu_util', name: 'GPU', color: colorAt(2), smooth: true },
  ] },
  { id: 'sys-mem', section: 'system', title: 'memory (MB)', tozero: true, traces: [
    { key: 'sys/mem_rss_mb', name: 'RSS of the training processes', color: colorAt(1) },
    { key: 'sys/gpu_mem_mb', name: 'GPU memory used', color: colorAt(3) },
  ] },
  { id: 'sys-power', section: 'system', title: 'GPU power (W)', tozero: true, traces: [
    { key: 'sys/gpu_power_w', name: 'GPU power', color: colorAt(4) },
  ] },
];
const SECTIONS = { training: 'training', timings: 'timings', system: 'system (sampled by the worker every 2 s)' };
// Keys read from the API (derived keys come from their source).
const KEYS = [...new Set(PANELS.flatMap((p) => p.traces.map((t) => t.from || t.key)))];
const DRAWN_KEYS = PANELS.flatMap((p) => p.traces.map((t) => t.key));
// Streamed by the server, not plotted: cursors skip their replay after a reconnect.
const OTHER_KEYS = ['samples', 'train_loss_epoch', 'train_err_epoch'];
const WHERE = {}; // drawn key -> [panel index, trace index, raw trace index or -1]
PANELS.forEach((p, pi) => {
  let raw = p.traces.length;
  p.traces.forEach((t, ti) => (WHERE[t.key] = [pi, ti, t.smooth ? raw++ : -1]));
});
const DERIVED = {}; // source key -> derived keys
PANELS.forEach((p) => p.traces.forEach((t) => t.from && (DERIVED[t.from] ||= []).push(t.key)));

/** The view's state from the URL (defaults: iteration, no smoothing, linear y). */
function readState(query) {
  const x = query.get('x');
  const smooth = Number(query.get('smooth') ?? 0);
  return {
    x: X_MODES.includes(x) ? x : 'step',
    smooth: Number.isFinite(smooth) ? Math.min(0.99, Math.max(0, smooth)) : 0,
    logy: query.get('logy') === '1',
    health: query.get('health') in HEALTH_STATS ? query.get('health') : 'dead',
  };
}

/** The URL's query for a state: only what differs from the defaults. */
function stateQuery(st) {
  return {
    x: st.x === 'step' ? '' : st.x,
    smooth: st.smooth > 0 ? String(st.smooth) : '',
    logy: st.logy ? '1' : '',
    health: st.health === 'dead' ? '' : st.health,
  };
}

/** The debiased EMA's running state after `smoothed` (its last value, finite count). */
function emaState(raw, smoothed, s) {
  let count = 0;
  let lastSmooth = null;
  raw.forEach((v, i) => {
    if (Number.isFinite(v)) {
      count++;
      lastSmooth = smoothed[i];
    }
  });
  const last = count && s < 1 ? lastSmooth * (1 - s ** count) : lastSmooth ?? 0;
  return { last, count };
}

/** One more value through the debiased EMA (smoothing.js's rule, incrementally). */
function emaNext(state, v, s) {
  if (!Number.isFinite(v)) return v;
  state.last = state.last * s + (1 - s) * v;
  state.count += 1;
  return s === 1 ? state.last : state.last / (1 - s ** state.count);
}

export async function mount(root, route) {
  const id = route.id;
  const st = readState(route.query);
  let run = null;
  let es = null;
  let stopped = false;
  let drawn = false;
  let lastStatusAt = 0;
  let fallbackTimer = null;
  let logTimer = null;
  let rafPending = false;
  const buffered = []; // SSE points received while the history is being (re)drawn
  const pending = []; // points waiting for the next animation frame
  const lastStep = Object.fromEntries(DRAWN_KEYS.map((k) => [k, -1]));
  const counts = Object.fromEntries(DRAWN_KEYS.map((k) => [k, 0]));
  // Every drawn key's points as read and received: x-axis changes, smoothing and log-y
  // redraw from here without a new read.
  let data = Object.fromEntries(DRAWN_KEYS.map((k) => [k, { step: [], epoch: [], wall_time: [], value: [] }]));
  const ema = {}; // key -> EMA state of its smoothed trace
  let Plotly = null;

  // ---------- skeleton ----------
  const title = h('h1', null, `run ${id}`);
  const badge = h('span', { class: 'badge' });
  const archivedBadge = h('span', { class: 'archived-flag', hidden: true }, 'archived');
  const cancelBtn = h('button', { class: 'danger', hidden: true, onclick: onCancel }, 'Cancel');
  const compareLink = h('a', { class: 'button', hidden: true }, 'Compare with baseline');
  const cloneLink = h('a', { class: 'button', href: href('new', { from: id }) }, 'Clone');
  const editBtn = h('button', { class: 'link', onclick: () => openEditor() }, 'edit');
  const archiveBtn = h('button', { class: 'link', onclick: onArchive }, 'archive');
  const deleteBtn = h('button', { class: 'link danger', onclick: onDelete }, 'delete');
  const xSel = h(
    'select',
    { name: 'x', title: 'x axis', onchange: () => {
      st.x = xSel.value;
      replaceQuery(stateQuery(st));
      // The x arrays differ in kind (and a zoom in one is meaningless in the other):
      // re-mount the view on the new axis.
      window.dispatchEvent(new HashChangeEvent('hashchange'));
    } },
    X_MODES.map((m) => h('option', { value: m }, X_LABEL[m])),
  );
  xSel.value = st.x;
  const logBox = h('input', { type: 'checkbox', name: 'logy', onchange: () => {
    st.logy = logBox.checked;
    replaceQuery(stateQuery(st));
    if (drawn) PANELS.forEach((p, i) => p.logy && Plotly.relayout(charts[i], { 'yaxis.type': st.logy ? 'log' : 'linear' }));
  } });
  logBox.checked = st.logy;
  const smoothVal = h('output', { class: 'smooth-val' }, st.smooth.toFixed(2));
  let smoothTimer = null;
  const smoothRange = h('input', {
    type: 'range', name: 'smooth', min: '0', max: '0.99', step: '0.01', value: String(st.smooth),
    oninput: () => {
      st.smooth = Number(smoothRange.value);
      setText(smoothVal, st.smooth.toFixed(2));
      replaceQuery(stateQuery(st));
      clearTimeout(smoothTimer);
      smoothTimer = setTimeout(() => drawn && drawAll(), 60);
    },
  });
  const bar = h('span', { class: 'fill' });
  const barText = h('span', { class: 'bar-text' });
  const tagsBox = h('span', { class: 'run-tags' });
  const notesBox = h('p', { class: 'run-notes', hidden: true });
  const editor = h('form', { class: 'run-editor', hidden: true });
  const facts = h('dl', { class: 'facts' });
  const summary = h('dl', { class: 'facts summary' });
  const errorBox = h('pre', { class: 'error-box', hidden: true });
  // Why a queued run is not taken (the API's waiting_for), e.g. no worker on its queue.
  const waitingBox = h('p', { class: 'waiting', hidden: true, style: { color: 'var(--warn)' } });
  // A multi-node run's gang (run.gang: its latest attempt's nodes, or the gang forming).
  const nodesBox = h('div', { class: 'table-wrap' });
  const nodesNote = h('p', { class: 'muted small nodes-note' });
  const nodesSection = h('div', { class: 'nodes-section', hidden: true }, h('h2', null, 'Nodes'), nodesNote, nodesBox);
  const emptyBox = h('div', { class: 'empty-state', hidden: true });
  const note = h('p', { class: 'muted small' });
  const downloads = h(
    'span',
    { class: 'downloads' },
    'download ',
    h('a', { href: `/api/runs/${id}/metrics.csv`, download: '' }, 'CSV'),
    ' · ',
    h('a', { href: `/api/runs/${id}/metrics.parquet`, download: '' }, 'Parquet'),
  );
  const checkpointLink = h('a', { class: 'checkpoint-link', href: `/api/runs/${id}/checkpoint`, download: '', hidden: true }, 'checkpoint');
  const extendN = h('input', { type: 'number', name: 'extend_epochs', min: '1', max: '1000', value: '5', style: { width: '4.5em' } });
  const extendForm = h(
    'form',
    { class: 'extend', hidden: true, onsubmit: onExtend },
    h('button', { type: 'submit' }, 'Train'), ' ', extendN, ' more epochs',
  );
  const specBox = h('details', { class: 'spec' }, h('summary', null, 'Full spec'));
  const charts = PANELS.map((p) => h('div', { class: 'chart', id: `chart-${p.id}`, dataset: { panel: p.id } }));
  const panels = PANELS.map((p, i) => h('div', { class: 'panel', dataset: { panel: p.id }, hidden: !p.always }, h('h3', null, p.title), charts[i]));
  const NOISE = PANELS.findIndex((p) => p.id === 'noise');
  const LOSS = PANELS.findIndex((p) => p.id === 'loss');
  const noiseVerdict = h('p', { class: 'noise-verdict small' });
  const noiseEmpty = h('p', { class: 'noise-empty muted small', hidden: true });
  panels[NOISE].insertBefore(noiseVerdict, charts[NOISE]);
  panels[NOISE].append(noiseEmpty);
  // Layer health: layers x time, one statistic at a time, x linked with the loss curve.
  const healthSel = h(
    'select',
    { name: 'health_stat', title: 'layer statistic', onchange: () => {
      st.health = healthSel.value;
      replaceQuery(stateQuery(st));
      drawHealth();
    } },
    Object.entries(HEALTH_STATS).map(([v, d]) => h('option', { value: v }, d.label)),
  );
  healthSel.value = st.health;
  const healthChart = h('div', { class: 'chart health-chart', id: 'chart-health', hidden: true });
  const healthEmpty = h('p', { class: 'health-empty muted small' }, 'Reading the layers…');
  const healthSection = h('div', { class: 'chart-section section-health' },
    h('h2', null, 'layer health ', h('small', { class: 'muted' }, '(per conv/linear layer, model order)')),
    h('div', { class: 'toolbar' }, healthSel),
    healthEmpty, healthChart);
  const sections = Object.entries(SECTIONS).map(([name, label]) => {
    const mine = PANELS.map((p, i) => [p, i]).filter(([p]) => p.section === name).map(([, i]) => panels[i]);
    return h('div', { class: `chart-section section-${name}`, hidden: name !== 'training' },
      name === 'training' ? null : h('h2', null, label), h('div', { class: 'charts' }, mine));
  });
  const chartsBox = h('div', { class: 'run-charts' }, sections[0], healthSection, sections.slice(1));
  const logPre = h('pre', { class: 'run-log', tabindex: '0' });
  const logInfo = h('span', { class: 'muted small' });
  const logBox_ = h('details', { class: 'run-log-box', open: true },
    h('summary', null, 'Log ', logInfo), logPre);

  replace(
    root,
    h(
      'section',
      { class: 'view run-view' },
      h(
        'div',
        { class: 'toolbar' },
        title,
        badge,
        archivedBadge,
        h('span', { class: 'progress live-progress' }, h('span', { class: 'bar' }, bar), barText),
        h('span', { class: 'spacer' }),
        compareLink,
        cloneLink,
        cancelBtn,
        editBtn,
        archiveBtn,
        deleteBtn,
      ),
      h('div', { class: 'run-meta' }, tagsBox, notesBox),
      editor,
      waitingBox,
      facts,
      errorBox,
      nodesSection,
      summary,
      h('div', { class: 'toolbar run-actions' }, downloads, checkpointLink, extendForm),
      h(
        'div',
        { class: 'toolbar plot-controls' },
        xSel,
        h('label', { class: 'smooth', title: 'debiased EMA (TensorBoard); raw curve faint beneath' }, 'smoothing ', smoothRange, smoothVal),
        h('label', null, logBox, ' log y'),
      ),
      emptyBox,
      chartsBox,
      note,
      logBox_,
      specBox,
    ),
  );

  // ---------- header ----------
  function renderRun(r) {
    run = r;
    const spec = r.spec || {};
    const { kn, peak, ipe, total } = derivedOf(r);
    setText(title, r.name || `run ${r.id}`);
    title.title = `run ${r.id}`;
    setText(badge, r.status);
    badge.className = `badge s-${r.status}`;
    archivedBadge.hidden = !r.archived;
    setText(archiveBtn, r.archived ? 'unarchive' : 'archive');
    const progress = Math.max(0, Math.min(1, r.progress ?? (r.status === STATUS.SUCCEEDED ? 1 : 0)));
    bar.style.width = `${(100 * progress).toFixed(1)}%`;
    let ptext = `${Math.round(100 * progress)}%`;
    if (r.status === STATUS.RUNNING && r.eta_s != null) ptext += ` · ETA ${duration(r.eta_s)}`;
    setText(barText, ptext);
    waitingBox.hidden = !r.waiting_for;
    setText(waitingBox, r.waiting_for ? `Queued — ${r.waiting_for}.` : '');
    cancelBtn.hidden = TERMINAL.has(r.status);
    if (r.baseline_id != null && r.baseline_id !== r.id) {
      compareLink.hidden = false;
      compareLink.href = href('compare', { runs: [r.baseline_id, r.id].sort((a, b) => a - b), baseline: r.baseline_id });
    }
    replace(tagsBox, (r.tags || []).map((t) => h('a', { class: 'tag', href: href('runs', { tag: t }) }, t)));
    notesBox.hidden = !r.notes;
    setText(notesBox, r.notes || '');
    checkpointLink.hidden = !spec.checkpoint || r.status === STATUS.QUEUED;
    extendForm.hidden = !(spec.checkpoint && TERMINAL.has(r.status) && r.status !== STATUS.FAILED);
    const items = [
      ['k × n', `${spec.workers} × ${spec.batch_per_worker} = ${formatKn(kn)}`],
      ['peak LR', `${num(peak, 4)} (${spec.scaling} from ${num(spec.base_lr)} per ${spec.ref_batch})`],
      ['warmup', spec.warmup === 'none' ? 'none' : `${spec.warmup}, ${num(spec.warmup_epochs)} epochs`],
      ['norm', spec.norm],
      ['model', `${spec.model} on ${spec.dataset}${spec.dataset_size ? ` (${spec.dataset_size})` : ''}`],
      ['epochs', `${spec.epochs}${ipe ? ` × ${ipe} it = ${total} it` : ''}`],
      ['optimizer', `${spec.optimizer}, m=${num(spec.momentum)}, wd=${num(spec.weight_decay)}`],
      ['where', [where(r), r.worker].filter(Boolean).join(' · ') || '–'],
      ['device', r.device || '–'],
      ['created', shortTime(r.created_at)],
      ['started', shortTime(r.started_at) || '–'],
      ['finished', shortTime(r.finished_at) || '–'],
    ];
    if ((r.nodes ?? spec.nodes ?? 1) > 1) {
      const nodes = r.nodes ?? spec.nodes;
      const nproc = spec.nproc ?? 1;
      items.splice(1, 0, ['nodes', `${nodes} × ${nproc} process${nproc === 1 ? '' : 'es'} = ${nodes * nproc}`]);
    }
    if (r.parent_id != null) items.push(['extends', h('a', { class: 'parent-link', href: `#/run/${r.parent_id}` }, `run ${r.parent_id}`)]);
    if (r.group_id != null) items.push(['group', h('a', { href: `#/sweep/${r.group_id}` }, `group ${r.group_id}`)]);
    if (r.baseline_id != null) items.push(['baseline', h('a', { href: `#/run/${r.baseline_id}` }, `run ${r.baseline_id}`)]);
    if (r.is_baseline) items.push(['role', 'baseline']);
    replace(facts, items.map(([k, v]) => h('div', null, h('dt', null, k), h('dd', null, v))));

    const s = r.summary || {};
    const sitems = [
      ['final val err', pct(s.final_val_err)],
      ['best val err', pct(s.best_val_err)],
      ['median last 5', pct(s.median_last5_val_err)],
      ['to target', s.iters_to_target != null ? `${s.iters_to_target} it · ${duration(s.time_to_target_s)}` : '–'],
      ['loss oscillation', num(s.loss_oscillation)],
      ['samples/s', num(s.samples_per_s, 4)],
      ['wall time', duration(s.wall_time_s)],
    ].filter(([, v]) => v !== '–');
    summary.hidden = sitems.length === 0;
    replace(summary, sitems.map(([k, v]) => h('div', null, h('dt', null, k), h('dd', null, v))));

    const problems = [];
    if (r.diverged_step != null) problems.push(`Diverged at iteration ${r.diverged_step}.`);
    if (r.error) problems.push(r.error);
    errorBox.hidden = problems.length === 0;
    setText(errorBox, problems.join('\n'));
    renderNodes(r);
    replace(
      specBox,
      h('summary', null, 'Full spec'),
      h('pre', null, JSON.stringify(spec, null, 2)),
    );
    renderEmpty();
    if (drawn) markDivergence();
  }

  /** A multi-node run's nodes: slot, host, worker, address, state, last beat, error. */
  function renderNodes(r) {
    const nodes = r.nodes ?? r.spec?.nodes ?? 1;
    nodesSection.hidden = nodes <= 1;
    if (nodes <= 1) return;
    const gang = r.gang || [];
    const attempt = gang.length ? gang[0].attempt : null;
    let text;
    if (!gang.length) text = r.status === STATUS.QUEUED ? `No node has joined yet (${nodes} needed).` : 'No node recorded for this run.';
    else if (r.status === STATUS.QUEUED) text = `Attempt ${attempt}: ${gang.length} of ${nodes} nodes joined.`;
    else text = `Attempt ${attempt}, ${nodes} nodes; slot 0 hosts the rendezvous.`;
    setText(nodesNote, text);
    replace(nodesBox, gang.length ? nodesTable(gang) : null);
    nodesBox.hidden = !gang.length;
  }

  /** Before the first point: say why there is nothing to plot instead of empty axes. */
  function renderEmpty() {
    const total = DRAWN_KEYS.reduce((a, k) => a + counts[k], 0);
    const empty = total === 0 && (drawn || run?.status === STATUS.QUEUED);
    chartsBox.hidden = empty;
    emptyBox.hidden = !empty || !run;
    if (!empty || !run) return;
    let head;
    let detail = '';
    switch (run.status) {
      case STATUS.QUEUED:
        head = 'Waiting for a worker';
        // A reason (no worker on its queue, ...) is in the waiting line above.
        detail = run.waiting_for ? '' : 'The run starts when a worker takes it from its queue.';
        break;
      case STATUS.RUNNING:
        head = 'Starting…';
        detail = 'The worker is loading the data and the model; the curves appear with the first iteration.';
        break;
      case STATUS.FAILED:
        head = 'Failed before the first iteration';
        detail = run.error ? `${run.error} — the log below says more.` : 'The log below says why.';
        break;
      case STATUS.CANCELLED:
        head = 'Cancelled before the first iteration';
        break;
      default:
        head = 'No points were recorded';
    }
    emptyBox.className = `empty-state empty-${run.status}`;
    replace(emptyBox, h('strong', null, head), detail ? h('p', null, detail) : null);
  }

  // ---------- plots ----------
  function kn() {
    return run ? derivedOf(run).kn : 1;
  }

  /** Samples per logged step: kn, or kn/m when each step is one of m backward splits. */
  function stepBatch() {
    return run ? derivedOf(run).perStep : 1;
  }

  function xAt(series, i) {
    if (st.x === 'samples') return (series.step[i] + 1) * stepBatch();
    return series[st.x][i];
  }

  function xsOf(series) {
    if (st.x === 'samples') {
      const k = stepBatch();
      return series.step.map((s) => (s + 1) * k);
    }
    return series[st.x].slice();
  }

  /** Values as plotted: scaled; derived keys computed from their source. */
  function derivedValue(key, v) {
    if (key === 'samples_per_s') return v > 0 ? stepBatch() / v : null;
    return v;
  }

  function tracesFor(panel) {
    const scale = panel.scale || 1;
    const out = [];
    const raws = [];
    for (const t of panel.traces) {
      const series = data[t.key];
      const xs = xsOf(series);
      const ys = series.value.map((v) => (v == null ? null : v * scale));
      const smooth = t.smooth && st.smooth > 0;
      const trace = {
        type: 'scatter',
        mode: t.markers ? 'lines+markers' : 'lines',
        name: t.name,
        x: xs,
        y: smooth ? debiasedEma(ys, st.smooth) : ys,
        line: { color: t.color, width: t.markers ? 1.5 : 1.2 },
        hovertemplate: `%{y:.4g}<extra>${t.name}</extra>`,
      };
      if (t.markers) trace.marker = { size: 5, color: t.color };
      if (smooth) ema[t.key] = emaState(ys, trace.y, st.smooth);
      out.push(trace);
      if (t.smooth) {
        raws.push({
          type: 'scatter', mode: 'lines', name: `${t.name} (raw)`, showlegend: false, hoverinfo: 'skip',
          x: xs.slice(), y: ys.slice(), visible: smooth, zorder: -1,
          line: { color: withAlpha(t.color, FIGURE.raw_alpha), width: 1 },
        });
      }
    }
    // Appended last, so the indices of WHERE (extendTraces) stay those of the curves.
    return [...out, ...raws, ...(panel.id === 'noise' ? noiseExtras() : [])];
  }

  /** The run's own kn across the noise-scale plot, over the x range of its points. */
  function noiseExtras() {
    const series = data.noise_scale;
    if (!run || !series.step.length) return [];
    const xs = xsOf(series).filter(Number.isFinite);
    if (!xs.length) return [];
    const k = kn();
    const label = `this run's kn = ${formatKn(k)}`;
    const x0 = Math.min(...xs);
    const x1 = Math.max(...xs);
    return [{
      type: 'scatter', mode: 'lines+text', name: label, x: [x0, x1], y: [k, k],
      text: ['', label], textposition: 'top left', textfont: { size: 11, color: BASELINE_COLOR },
      line: { color: BASELINE_COLOR, width: 1.2, dash: 'dash' }, hoverinfo: 'skip', meta: { role: 'kn' },
    }];
  }

  /** "kn is above / below the noise scale", from the latest smoothed value; the empty state. */
  function renderNoise() {
    const series = data.noise_scale;
    const spec = run?.spec || {};
    const has = series.value.some((v) => Number.isFinite(v));
    charts[NOISE].hidden = !has;
    noiseEmpty.hidden = has;
    noiseVerdict.hidden = !has;
    if (!has) {
      let text;
      if (spec.noise_every === 0) text = 'No noise scale: this run does not measure it (noise_every = 0).';
      else if (spec.noise_every == null) text = 'No noise scale: this run was trained without the measurement.';
      else if (spec.backward_splits > 1) text = 'No noise scale: it is not measured with backward_splits > 1 (no plain kn gradient to pair with a small one).';
      else if (run && TERMINAL.has(run.status)) text = 'No noise-scale points were recorded for this run.';
      else text = `No noise-scale point yet: it is measured every ${spec.noise_every} iterations.`;
      setText(noiseEmpty, text);
      return;
    }
    const smoothed = st.smooth > 0 ? debiasedEma(series.value, st.smooth) : series.value;
    let latest = null;
    for (let i = smoothed.length - 1; i >= 0; i--) {
      if (Number.isFinite(smoothed[i])) {
        latest = smoothed[i];
        break;
      }
    }
    const k = kn();
    const side = k > latest ? 'above' : 'below';
    const why = side === 'above'
      ? 'past it, a larger batch buys little extra progress per step'
      : 'a larger batch would still speed training up almost proportionally';
    setText(noiseVerdict, `kn = ${formatKn(k)} is ${side} the noise scale (B_simple ≈ ${num(latest, 3)}${st.smooth > 0 ? ', smoothed' : ''}): ${why}.`);
    noiseVerdict.dataset.side = side;
  }

  function layoutFor(panel) {
    const shown = panel.traces.filter((t) => counts[t.key] > 0).length;
    return baseLayout({
      margin: { l: 52, r: 12, t: panel.traces.length > 1 ? 26 : 10, b: 36 },
      showlegend: panel.traces.length > 1 && shown > 0,
      legend: { orientation: 'h', x: 0, y: 1, yanchor: 'bottom', font: { size: 11 } },
      // From the run's start on every panel: the system sampler's first point comes a few
      // seconds in, and its panel would otherwise start there, unaligned with the others.
      xaxis: axis({ title: { text: FIGURE.x_titles[st.x] }, rangemode: 'tozero' }),
      yaxis: axis({
        exponentformat: 'power',
        rangemode: panel.tozero ? 'tozero' : 'normal',
        type: panel.log || (panel.logy && st.logy) ? 'log' : 'linear',
      }),
      uirevision: 'keep',
      ...divergenceMarks(),
    });
  }

  /** Show the panels that have points (and the sections holding them). */
  function revealPanels() {
    let changed = false;
    PANELS.forEach((p, i) => {
      const has = p.always || p.traces.some((t) => counts[t.key] > 0);
      if (has && panels[i].hidden) {
        panels[i].hidden = false;
        changed = true;
      }
    });
    sections.forEach((sec) => {
      const any = [...sec.querySelectorAll('.panel')].some((el) => !el.hidden);
      if (any && sec.hidden) {
        sec.hidden = false;
        changed = true;
      }
    });
    return changed;
  }

  async function drawAll() {
    revealPanels();
    const noiseWasHidden = charts[NOISE].hidden;
    renderNoise();
    await Promise.all(PANELS.map((p, i) => Plotly.react(charts[i], tracesFor(p), layoutFor(p), PLOT_CONFIG)));
    if (noiseWasHidden && !charts[NOISE].hidden) Plotly.Plots.resize(charts[NOISE]);
  }

  function takeHistory(series) {
    data = Object.fromEntries(DRAWN_KEYS.map((k) => [k, { step: [], epoch: [], wall_time: [], value: [] }]));
    for (const k of KEYS) {
      const s = series[k];
      if (!s) continue;
      data[k] = { step: s.step.slice(), epoch: s.epoch.slice(), wall_time: s.wall_time.slice(), value: s.value.slice() };
      for (const d of DERIVED[k] || []) data[d] = { ...data[k], value: s.value.map((v) => derivedValue(d, v)) };
    }
    for (const k of DRAWN_KEYS) {
      const n = data[k].step.length;
      lastStep[k] = n ? data[k].step[n - 1] : -1;
      counts[k] = n;
    }
  }

  async function drawHistory(history) {
    Plotly = await loadPlotly();
    if (stopped) return;
    takeHistory(history.series || {});
    const wasEmpty = chartsBox.hidden;
    await drawAll();
    drawn = true;
    marked = run?.diverged_step != null;
    renderEmpty();
    if (wasEmpty && !chartsBox.hidden) charts.forEach((c) => !c.hidden && Plotly.Plots.resize(c));
    setText(note, '');
    announceDrawn({ view: 'run', runId: Number(id), lastStep: { ...lastStep } });
  }

  /** A dashed red line where the run diverged (shapes and annotations of a layout). */
  function divergenceMarks() {
    if (!run || run.diverged_step == null || st.x === 'wall_time') return { shapes: [], annotations: [] };
    const ipe = derivedOf(run).ipe;
    let x = run.diverged_step;
    if (st.x === 'epoch' && ipe) x = run.diverged_step / ipe;
    if (st.x === 'samples') x = (run.diverged_step + 1) * stepBatch();
    return {
      shapes: [{ type: 'line', xref: 'x', yref: 'paper', x0: x, x1: x, y0: 0, y1: 1,
        line: { color: '#c0392b', width: 1.5, dash: 'dash' } }],
      annotations: [{ xref: 'x', yref: 'paper', x, y: 1, text: 'diverged', showarrow: false,
        xanchor: 'right', font: { color: '#c0392b', size: 11 } }],
    };
  }

  let marked = false;
  /** Mark a divergence reported while the page is open (live status event). */
  function markDivergence() {
    if (!drawn || marked || !run || run.diverged_step == null) return;
    marked = true;
    const marks = divergenceMarks();
    charts.forEach((c) => Plotly.relayout(c, marks));
  }

  /** Queue SSE points; flush them into the plots on the next animation frame. */
  function onPoints(points) {
    if (points.some((p) => p.key.startsWith('health/'))) scheduleHealth();
    if (!drawn) {
      buffered.push(...points);
      return;
    }
    pending.push(...points);
    if (!rafPending) {
      rafPending = true;
      requestAnimationFrame(flush);
    }
  }

  /** The points as drawn keys: derived keys added beside their source. */
  function expand(points) {
    const out = [];
    for (const pt of points) {
      if (pt.key in WHERE) out.push(pt);
      for (const d of DERIVED[pt.key] || []) out.push({ ...pt, key: d, value: derivedValue(d, pt.value) });
    }
    return out;
  }

  async function flush() {
    rafPending = false;
    if (stopped || pending.length === 0) return;
    const points = expand(pending.splice(0));
    const per = PANELS.map((p) => ({ idx: [], x: [], y: [], at: {} }));
    const wasEmpty = chartsBox.hidden;
    let added = 0;
    const push = (pi, ti, x, y) => {
      const u = per[pi];
      if (!(ti in u.at)) {
        u.at[ti] = u.idx.length;
        u.idx.push(ti);
        u.x.push([]);
        u.y.push([]);
      }
      u.x[u.at[ti]].push(x);
      u.y[u.at[ti]].push(y);
    };
    const panelsBefore = PANELS.map((p) => p.traces.some((t) => counts[t.key] > 0));
    for (const pt of points) {
      const [pi, ti, ri] = WHERE[pt.key];
      if (pt.step <= lastStep[pt.key]) continue; // already drawn
      lastStep[pt.key] = pt.step;
      counts[pt.key]++;
      const series = data[pt.key];
      series.step.push(pt.step);
      series.epoch.push(pt.epoch);
      series.wall_time.push(pt.wall_time);
      series.value.push(pt.value);
      const x = xAt(series, series.step.length - 1);
      const y = pt.value == null ? null : pt.value * (PANELS[pi].scale || 1);
      if (ri >= 0) {
        push(pi, ri, x, y);
        const s = st.smooth;
        push(pi, ti, x, s > 0 ? emaNext((ema[pt.key] ||= { last: 0, count: 0 }), y, s) : y);
      } else {
        push(pi, ti, x, y);
      }
      added++;
    }
    if (!added) return;
    // A panel's first points: its legend and section appear (a full draw of that panel).
    const redraw = PANELS.map((p, i) => !panelsBefore[i] && p.traces.some((t) => counts[t.key] > 0));
    const revealed = revealPanels();
    if (per[NOISE].idx.length) redraw[NOISE] = true; // its kn line spans the new points
    const noiseWasHidden = charts[NOISE].hidden;
    renderNoise();
    if (noiseWasHidden && !charts[NOISE].hidden) requestAnimationFrame(() => Plotly.Plots.resize(charts[NOISE]));
    const jobs = per.map((u, pi) => {
      if (redraw[pi]) return Plotly.react(charts[pi], tracesFor(PANELS[pi]), layoutFor(PANELS[pi]), PLOT_CONFIG);
      return u.idx.length ? Plotly.extendTraces(charts[pi], { x: u.x, y: u.y }, u.idx) : null;
    });
    await Promise.all(jobs);
    renderEmpty();
    if ((wasEmpty && !chartsBox.hidden) || revealed) charts.forEach((c, i) => !panels[i].hidden && !c.hidden && Plotly.Plots.resize(c));
    announceDrawn({ view: 'run', runId: Number(id), lastStep: { ...lastStep } });
    if (Math.max(...Object.values(counts)) > REDOWNSAMPLE_AT) reloadHistory();
  }

  function readHistory() {
    // Samples are a function of the step: read by step, mapped here.
    return api.runMetrics(id, { keys: KEYS, x: st.x === 'samples' ? 'step' : st.x, max_points: HISTORY_POINTS });
  }

  let reloading = false;
  async function reloadHistory() {
    if (reloading) return;
    reloading = true;
    try {
      drawn = false; // new SSE points buffer while the downsampled history is read
      const history = await readHistory();
      if (stopped) return;
      await drawHistory(history);
      const late = buffered.splice(0);
      onPoints(late);
    } finally {
      reloading = false;
    }
  }

  // ---------- layer health ----------
  let runKeys = []; // every metric key of the run (GET /api/runs/ID/keys)
  let health = parseHealthKeys([]);
  let healthCache = {}; // stat -> {layer: Series}
  let healthTimer = null;
  let healthLinked = false;
  let healthSeq = 0;

  async function readKeys() {
    try {
      runKeys = (await api.runKeys(id)).keys;
    } catch {
      runKeys = [];
    }
    health = parseHealthKeys(runKeys);
  }

  function healthMessage(stat) {
    const every = run?.spec?.health_every;
    if (health.layers.length) {
      return stat === 'dead'
        ? 'No layer of this run is followed by a ReLU: there is no dead fraction to show.'
        : `No ${HEALTH_STATS[stat].label} points in this run.`;
    }
    if (every === 0) return 'No layer health: this run does not measure it (health_every = 0).';
    if (every == null) return 'No layer health: this run was trained without the measurement.';
    if (run && TERMINAL.has(run.status)) return 'No layer-health points were recorded for this run.';
    return `No layer-health point yet: it is measured every ${every} iterations.`;
  }

  async function drawHealth() {
    const mine = ++healthSeq;
    const stat = st.health;
    if (!health.layers.length && run && !TERMINAL.has(run.status)) await readKeys(); // new layers
    const layers = health.byStat[stat] || [];
    if (!layers.length) {
      healthChart.hidden = true;
      healthEmpty.hidden = false;
      setText(healthEmpty, healthMessage(stat));
      announceDrawn({ view: 'health', runId: Number(id), stat, rows: 0 });
      return;
    }
    Plotly = Plotly || (await loadPlotly());
    if (!healthCache[stat]) {
      const params = { x: st.x === 'samples' ? 'step' : st.x, max_points: HEALTH_POINTS };
      const got = await readRunStat(id, layers, stat, params);
      if (stopped || mine !== healthSeq) return;
      healthCache[stat] = got;
    }
    const grid = heatmapGrid(rowsOf(healthCache[stat], layers, xsOf));
    const wasHidden = healthChart.hidden;
    healthChart.hidden = false;
    healthEmpty.hidden = true;
    const lossRange = drawn && !charts[LOSS].layout?.xaxis?.autorange ? charts[LOSS].layout?.xaxis?.range : null;
    const layout = heatmapLayout({ xTitle: FIGURE.x_titles[st.x], rows: grid.y.length, xRange: lossRange });
    await Plotly.react(healthChart, [heatmapTrace(grid, stat, { xTitle: FIGURE.x_titles[st.x] })], layout, PLOT_CONFIG);
    if (stopped) return;
    if (wasHidden) Plotly.Plots.resize(healthChart);
    if (!healthLinked && drawn) {
      healthLinked = true;
      linkX(Plotly, charts[LOSS], healthChart);
    }
    announceDrawn({ view: 'health', runId: Number(id), stat, rows: grid.y.length, cols: grid.x.length });
  }

  /** New health points arrived over SSE: re-read the heatmap, at most every few seconds. */
  function scheduleHealth() {
    if (healthTimer) return;
    healthTimer = setTimeout(async () => {
      healthTimer = null;
      if (stopped) return;
      await readKeys();
      healthCache = {};
      drawHealth().catch(() => {});
    }, HEALTH_REFRESH_MS);
  }

  // ---------- live ----------
  function openStream() {
    // Cursors for the plotted keys, and for the trainer's other keys (not drawn here) the
    // newest step seen, so a long run's stream does not start by replaying them.
    const sources = Object.fromEntries(KEYS.map((k) => [k, lastStep[k] ?? -1]));
    for (const [src, ds] of Object.entries(DERIVED)) sources[src] = Math.max(...ds.map((d) => lastStep[d]));
    const newest = Math.max(...Object.values(sources));
    const cursors = KEYS.filter((k) => sources[k] >= 0).map((k) => `${k}:${sources[k]}`);
    // Keys not plotted as curves (noise components, health/...: the heatmap reads its own)
    // start at the newest step too, so the stream does not replay their history.
    // Bounded (a deep model has hundreds of health keys): past it, keys replay instead.
    const others = [...new Set([...OTHER_KEYS, ...runKeys.filter((k) => !(k in sources))])];
    let room = MAX_CURSOR_CHARS;
    if (newest >= 0) {
      for (const k of others) {
        const c = `${k}:${newest}`;
        if ((room -= c.length + 1) < 0) break;
        cursors.push(c);
      }
    }
    const since = cursors.join(',');
    es = new EventSource(`${api.streamUrl(id)}${since ? `?since=${encodeURIComponent(since)}` : ''}`);
    es.addEventListener('points', (ev) => {
      try {
        onPoints(JSON.parse(ev.data).points || []);
      } catch (err) {
        console.error('bad points event', err);
      }
    });
    es.addEventListener('status', (ev) => {
      lastStatusAt = Date.now();
      try {
        renderRun(JSON.parse(ev.data));
      } catch (err) {
        console.error('bad status event', err);
      }
      if (TERMINAL.has(run.status)) closeSoon();
    });
    es.addEventListener('gone', () => {
      es.close();
      alertError(`Run ${id} was deleted.`);
    });
    es.onerror = () => {
      // The server ends the stream when the run is over; EventSource would reconnect.
      if (run && TERMINAL.has(run.status)) es.close();
    };
  }

  let closeTimer = null;
  function closeSoon() {
    // Let the last points (sent just before the final status) arrive, then stop.
    clearTimeout(closeTimer);
    closeTimer = setTimeout(() => es && es.close(), 1500);
  }

  /** When status events stop (old server, proxy), refresh the header by polling. */
  function fallback() {
    fallbackTimer = setTimeout(async () => {
      if (stopped) return;
      if (!document.hidden && Date.now() - lastStatusAt > STATUS_FALLBACK_MS && run && !TERMINAL.has(run.status)) {
        try {
          renderRun(await api.run(id));
        } catch {
          /* keep the last view */
        }
      }
      fallback();
    }, STATUS_FALLBACK_MS);
  }

  // ---------- log ----------
  let logNext = null; // the seq to ask after; null before the first read
  let logDone = false;

  function appendLog(lines) {
    if (!lines.length) return;
    // Follow the tail unless the reader scrolled up.
    const follow = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 24;
    for (const line of lines) {
      logPre.append(h('span', { class: `log-line log-${line.stream}`, dataset: { seq: line.seq } }, `${line.text}\n`));
    }
    while (logPre.childElementCount > LOG_KEEP) logPre.firstElementChild.remove();
    const count = logPre.childElementCount;
    setText(logInfo, `(${count} ${count === 1 ? 'line' : 'lines'}${count >= LOG_KEEP ? ', the newest' : ''})`);
    if (follow) logPre.scrollTop = logPre.scrollHeight;
  }

  async function pollLog() {
    if (stopped) return;
    try {
      const got = await request('GET', `/api/runs/${id}/log${qs({ tail: LOG_TAIL, after: logNext })}`);
      if (stopped) return;
      appendLog(got.lines);
      logNext = got.next;
      if (logNext === 0 && !logPre.childElementCount) setText(logInfo, '(empty)');
    } catch {
      /* the next poll retries */
    }
    // Live runs: poll; a finished run gets one last read after its final status.
    if (run && TERMINAL.has(run.status)) {
      if (logDone) return;
      logDone = true;
    }
    logTimer = setTimeout(pollLog, LOG_POLL_MS);
  }

  // ---------- management ----------
  async function patch(body) {
    const r = await request('PATCH', `/api/runs/${id}`, body);
    renderRun(r);
    return r;
  }

  function openEditor() {
    const name = h('input', { name: 'name', value: run?.name || '', maxlength: '200' });
    const tags = h('input', { name: 'tags', value: (run?.tags || []).join(', '), placeholder: 'comma-separated' });
    const notes = h('textarea', { name: 'notes', rows: '3' });
    notes.value = run?.notes || '';
    const err = h('p', { class: 'error', hidden: true });
    replace(
      editor,
      h('label', null, 'name ', name),
      h('label', null, 'tags ', tags),
      h('label', null, 'notes ', notes),
      h('span', null, h('button', { type: 'submit' }, 'Save'), ' ',
        h('button', { type: 'button', class: 'link', onclick: () => (editor.hidden = true) }, 'cancel')),
      err,
    );
    editor.onsubmit = async (ev) => {
      ev.preventDefault();
      try {
        await patch({
          name: name.value.trim(),
          tags: tags.value.split(',').map((t) => t.trim()).filter(Boolean),
          notes: notes.value,
        });
        editor.hidden = true;
      } catch (e) {
        err.hidden = false;
        setText(err, String(e.message || e));
      }
    };
    editor.hidden = false;
    name.focus();
  }

  async function onArchive() {
    try {
      await patch({ archived: !run?.archived });
    } catch (err) {
      alertError(err);
    }
  }

  async function onExtend(ev) {
    ev.preventDefault();
    const epochs = Number(extendN.value);
    try {
      const child = await request('POST', `/api/runs/${id}/extend`, { epochs });
      go(`run/${child.id}`);
    } catch (err) {
      alertError(err);
    }
  }

  async function onCancel() {
    // Like delete: a stray click must not end hours of training.
    if (!window.confirm(`Cancel run ${id}? Training stops at its next step.`)) return;
    cancelBtn.disabled = true;
    try {
      renderRun(await api.cancelRun(id));
    } catch (err) {
      alertError(err);
    } finally {
      cancelBtn.disabled = false;
    }
  }

  async function onDelete() {
    if (!window.confirm(`Delete run ${id} and all its metrics?`)) return;
    try {
      await api.deleteRun(id);
      go('runs');
    } catch (err) {
      alertError(err);
    }
  }

  function alertError(err) {
    errorBox.hidden = false;
    setText(errorBox, String(err.message || err));
  }

  // ---------- start ----------
  // Run and history in parallel; Plotly compiles while they are on the way.
  const history = readHistory();
  history.catch(() => {}); // handled below; a 404 is reported through api.run
  const keysRead = readKeys();
  loadPlotly().catch(() => {});
  try {
    renderRun(await api.run(id));
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      replace(root, h('p', { class: 'error' }, `Run ${id} not found.`), h('a', { href: '#/runs' }, 'All runs'));
      return () => {};
    }
    throw err;
  }
  fallback();
  pollLog();
  try {
    const got = await history;
    if (!stopped) await drawHistory(got);
  } catch (err) {
    if (!stopped) setText(note, `Could not load metrics: ${err.message || err}`);
  }
  await keysRead;
  if (!stopped) {
    drawHealth().catch((err) => {
      if (!stopped) setText(healthEmpty, `Could not load layer health: ${err.message || err}`);
    });
  }
  // The stream resumes after the last step the history holds, per key: points logged
  // since the history was read arrive first, nothing is sent twice.
  if (!stopped && !TERMINAL.has(run.status)) openStream();

  return () => {
    stopped = true;
    if (es) es.close();
    clearTimeout(fallbackTimer);
    clearTimeout(closeTimer);
    clearTimeout(logTimer);
    clearTimeout(smoothTimer);
    clearTimeout(healthTimer);
    charts.forEach(purge);
    purge(healthChart);
  };
}
