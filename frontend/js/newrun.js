// #/new : the RunSpec form, a live preview (debounced) of the runs it would create (POST
// /api/plan/run or /api/plan/sweep: sizes, baselines, warnings) and of their planned LR
// curves (POST /api/schedule), and submission of one run (optionally with its baseline) or
// of a sweep over total batch sizes and seeds. Validation is the server's: every 422 error
// is shown next to the field named by the last element of its `loc`.
//
// State in the URL: fields that differ from the defaults, mode=sweep, batch_sizes, seeds,
// name, baseline=1, or from=ID to start from an existing run's spec.

import { api, ApiError, request } from './api.js';
import { h, replace, setText } from './escape.js';
import { formatKn, num } from './format.js';
import {
  announceDrawn,
  axis,
  BASELINE_COLOR,
  baseLayout,
  colorAt,
  loadPlotly,
  PLOT_CONFIG,
  purge,
} from './plots.js';
import { go, replaceQuery } from './router.js';
import { defaultSpec, FIELDS, GROUPS } from './spec_fields.js';

const DEBOUNCE_MS = 200;
const MAX_SWEEP_PREVIEW = 12;

// Fields that only matter for some settings: shown dimmed otherwise (never hidden, so an
// error on them stays visible).
const RELEVANT = {
  data_root: (s) => ['mnist', 'cifar10', 'imagefolder'].includes(s.dataset),
  ghost_batch: (s) => s.norm === 'bn_ghost',
  cbn_window: (s) => s.norm === 'cbn',
  gn_groups: (s) => s.norm === 'gn',
  warmup_epochs: (s) => s.warmup !== 'none',
  milestones: (s) => s.decay === 'step',
  decay_factor: (s) => s.decay === 'step',
  momentum_correction: (s) => s.momentum_form === 'caffe',
};

// Cross-field rules (trainer/spec.py) put their error on the later field; the user may have
// changed another one of these: the error is shown there too (the field last edited).
const CAUSES = {
  dataset: ['model'],
  dataset_size: ['dataset', 'model'],
  data_root: ['dataset'],
  batch_per_worker: ['workers', 'dataset', 'dataset_size'],
  nproc: ['workers'],
  nodes: ['workers', 'nproc'],
  micro_batch: ['batch_per_worker'],
  backward_splits: ['workers', 'batch_per_worker', 'nproc', 'nodes', 'micro_batch'],
  warmup_epochs: ['epochs', 'warmup'],
  milestones: ['epochs', 'decay'],
  nesterov: ['momentum'],
  ghost_batch: ['norm', 'batch_per_worker'],
};

/** The paper's 30, 60, 80 of 90 epochs scaled to `epochs` (RunSpec's default milestones). */
export function paperMilestones(epochs) {
  return [30, 60, 80].map((m) => Math.round((epochs * m * 100) / 90) / 100);
}

/**
 * Expand a list of total batch sizes: "32, 64, 128, ..., 4096" continues the last ratio
 * (doubling when only one value precedes the ellipsis). Tokens that are not integers are
 * kept as strings so the server names them (batch_sizes[i]).
 */
export function parseBatchSizes(text) {
  const tokens = String(text)
    .split(/[\s,;]+/)
    .map((t) => t.trim())
    .filter(Boolean);
  const out = [];
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    if ((t === '...' || t === '…') && out.length && i + 1 < tokens.length) {
      const end = parseNumber(tokens[i + 1]);
      const last = out[out.length - 1];
      const prev = out.length > 1 ? out[out.length - 2] : null;
      if (typeof end !== 'number' || typeof last !== 'number') continue;
      const ratio = typeof prev === 'number' && prev > 0 && last > prev ? last / prev : 2;
      for (let v = last * ratio; v < end && out.length < 64; v *= ratio) out.push(Math.round(v));
      continue;
    }
    out.push(parseNumber(t));
  }
  return out;
}

function parseNumber(token) {
  if (/^[+-]?\d+$/.test(token)) return parseInt(token, 10);
  if (/^[+-]?\d+k$/i.test(token)) return parseInt(token, 10) * 1024;
  const x = Number(token);
  return token !== '' && Number.isFinite(x) ? x : token;
}

export async function mount(root, route) {
  const inputs = {}; // field name -> input element
  const slots = {}; // field name -> {wrap, err}
  let previewTimer = null;
  let previewAbort = null;
  let stopped = false;
  let plotted = false;
  let lastEdited = null; // the spec field the user changed last (CAUSES)

  // ---------- controls outside the spec ----------
  const nameInput = h('input', { type: 'text', name: 'name', placeholder: 'optional, e.g. kn=1k gradual' });
  const baselineBox = h('input', { type: 'checkbox', name: 'baseline' });
  const sizesInput = h('input', {
    type: 'text',
    name: 'batch_sizes',
    value: '32, 64, 128, ..., 2048',
    placeholder: '32, 64, 128, ..., 4096',
  });
  const sizesEcho = h('small', { class: 'muted' });
  // "auto" (POST /api/sweeps): a geometric ladder around the baseline's measured noise
  // scale, planned once the baseline has finished. The box and the literal text agree.
  let typedSizes = '';
  const autoBox = h('input', { type: 'checkbox', name: 'auto_sizes', onchange: () => {
    if (autoBox.checked) {
      typedSizes = sizesAuto() ? typedSizes : sizesInput.value;
      sizesInput.value = 'auto';
      baselineBox.checked = true; // the ladder is read off the baseline's noise scale
    } else {
      sizesInput.value = typedSizes || '32, 64, 128, ..., 2048';
    }
    sizesInput.readOnly = autoBox.checked;
  } });
  const seedsInput = h('input', { type: 'text', name: 'seeds', value: '0', placeholder: '0, 1, 2' });
  const modeSingle = h('input', { type: 'radio', name: 'mode', value: 'single', checked: true });
  const modeSweep = h('input', {
    type: 'radio',
    name: 'mode',
    value: 'sweep',
    // A sweep is read against its baseline (Figure 1): on by default, as the API has it.
    onchange: () => {
      if (modeSweep.checked) baselineBox.checked = true;
    },
  });
  const submitBtn = h('button', { type: 'submit', class: 'primary big' }, 'Start run');
  const formError = h('p', { class: 'error', hidden: true });
  const stats = h('div', { class: 'stats-box' });
  const previewNote = h('p', { class: 'muted small' });
  // The plan's "no live worker serves queue gpu" warnings, right above the button.
  const queueWarn = h('p', {
    class: 'queue-warning small',
    hidden: true,
    style: { color: 'var(--warn)', whiteSpace: 'pre-line' },
  });
  const chart = h('div', { class: 'chart lr-preview', id: 'lr-preview' });

  function slot(name, label, control, help, extraClass = '') {
    const err = h('small', { class: 'err', role: 'alert' });
    const wrap = h(
      'div',
      { class: `field ${extraClass}`, dataset: { field: name } },
      h('label', { for: `f-${name}`, title: help || '' }, label),
      control,
      err,
    );
    control.id = `f-${name}`;
    slots[name] = { wrap, err };
    return wrap;
  }

  function control(f) {
    let el;
    if (f.kind === 'select') {
      el = h('select', { name: f.name }, f.options.map((o) => h('option', { value: o }, o)));
    } else if (f.kind === 'bool') {
      el = h('input', { type: 'checkbox', name: f.name });
    } else {
      // Text inputs with numeric keyboards: whatever is typed reaches the server, whose
      // message (not the browser's silent blanking of type=number) explains the problem.
      el = h('input', {
        type: 'text',
        name: f.name,
        inputmode: f.kind === 'int' ? 'numeric' : f.kind === 'text' ? 'text' : 'decimal',
        placeholder: f.placeholder || '',
        autocomplete: 'off',
        spellcheck: 'false',
      });
    }
    inputs[f.name] = el;
    return el;
  }

  const fieldsets = GROUPS.map(([group, title]) =>
    h(
      'fieldset',
      { class: `group g-${group}` },
      h('legend', null, title),
      FIELDS.filter((f) => f.group === group).map((f) =>
        slot(f.name, f.label || f.name.replace(/_/g, ' '), control(f), f.help, f.kind === 'bool' ? 'bool' : ''),
      ),
    ),
  );

  const sweepBox = h(
    'fieldset',
    { class: 'group sweep-only' },
    h('legend', null, 'Sweep'),
    slot('batch_sizes', 'total batch sizes k·n', sizesInput, 'Comma-separated; "..." continues the ratio; "auto" from the noise scale'),
    h('label', { class: 'switch', title: 'The sizes follow the baseline’s measured gradient noise scale (needs noise_every > 0)' },
      autoBox, ' auto: around the baseline’s noise scale'),
    sizesEcho,
    slot('seeds', 'seeds', seedsInput, 'One run per batch size and seed'),
  );

  const form = h(
    'form',
    { class: 'newrun', novalidate: true, onsubmit: onSubmit, oninput: onChange, onchange: onChange },
    h(
      'div',
      { class: 'form-main' },
      h(
        'div',
        { class: 'toolbar' },
        h('h1', null, 'New run'),
        h(
          'div',
          { class: 'segmented', role: 'radiogroup' },
          h('label', null, modeSingle, ' single run'),
          h('label', null, modeSweep, ' batch-size sweep'),
        ),
        h('span', { class: 'spacer' }),
        h('button', { type: 'button', class: 'link', onclick: resetDefaults }, 'reset to defaults'),
      ),
      sweepBox,
      h('div', { class: 'fieldsets' }, fieldsets),
    ),
    h(
      'aside',
      { class: 'form-side' },
      h('h2', null, 'Planned learning rate'),
      chart,
      stats,
      previewNote,
      slot('name', 'name', nameInput, 'Shown in tables and legends'),
      h(
        'label',
        { class: 'switch', title: 'Also run kn = ref_batch with the same settings and no warmup' },
        baselineBox,
        ' with baseline (k·n = ref batch, no warmup)',
      ),
      formError,
      queueWarn,
      submitBtn,
    ),
  );
  replace(root, h('section', { class: 'view new-view' }, form));

  // ---------- state <-> inputs ----------
  function setInputs(spec) {
    for (const f of FIELDS) {
      const el = inputs[f.name];
      const v = spec[f.name];
      if (f.kind === 'bool') el.checked = Boolean(v);
      else if (f.kind === 'floats') el.value = Array.isArray(v) ? v.join(', ') : String(v ?? '');
      else el.value = v == null ? '' : String(v);
    }
  }

  /** Read the spec as typed; unparsable text is sent as-is so the server names it. */
  function readSpec() {
    const spec = {};
    for (const f of FIELDS) {
      const el = inputs[f.name];
      if (f.kind === 'bool') spec[f.name] = el.checked;
      else if (f.kind === 'select') spec[f.name] = el.value;
      else if (f.kind === 'floats') {
        spec[f.name] = el.value
          .split(/[\s,;]+/)
          .filter(Boolean)
          .map(parseNumber);
      } else {
        const raw = el.value.trim();
        if (raw === '') spec[f.name] = f.nullable ? null : raw;
        else if (f.kind === 'text') spec[f.name] = raw;
        else spec[f.name] = parseNumber(raw);
      }
    }
    return spec;
  }

  function isSweep() {
    return modeSweep.checked;
  }

  function sizesAuto() {
    return sizesInput.value.trim().toLowerCase() === 'auto';
  }

  function saveQuery(spec) {
    const q = {};
    const defaults = defaultSpec();
    for (const f of FIELDS) {
      const v = spec[f.name];
      if (JSON.stringify(v) === JSON.stringify(defaults[f.name])) continue;
      q[f.name] = v == null ? 'null' : Array.isArray(v) ? v.join(',') : String(v);
    }
    if (isSweep()) {
      q.mode = 'sweep';
      q.batch_sizes = sizesInput.value;
      q.seeds = seedsInput.value;
    }
    if (nameInput.value) q.name = nameInput.value;
    if (baselineBox.checked) q.baseline = '1';
    replaceQuery(q);
  }

  function loadQuery(query) {
    const spec = defaultSpec();
    for (const f of FIELDS) {
      if (!query.has(f.name)) continue;
      const raw = query.get(f.name);
      if (raw === 'null') spec[f.name] = null;
      else if (f.kind === 'bool') spec[f.name] = raw === 'true';
      else if (f.kind === 'floats') spec[f.name] = raw.split(',').filter(Boolean).map(parseNumber);
      else spec[f.name] = raw;
    }
    return spec;
  }

  function resetDefaults() {
    setInputs(defaultSpec());
    epochsShown = Number(defaultSpec().epochs);
    clearErrors();
    onChange();
  }

  // ---------- errors ----------
  function clearErrors() {
    for (const s of Object.values(slots)) {
      setText(s.err, '');
      s.wrap.classList.remove('invalid');
    }
    formError.hidden = true;
  }

  /** Show a 422's errors beside their fields; others above the submit button. */
  function showErrors(err) {
    clearErrors();
    const loose = [];
    let first = null;
    for (const e of err.fieldErrors()) {
      const s = slots[e.field];
      if (!s) {
        loose.push(e.line);
        continue;
      }
      const text = e.index != null ? `[${e.index}] ${e.msg}` : e.msg;
      const shown = [s];
      if (lastEdited && lastEdited !== e.field && (CAUSES[e.field] || []).includes(lastEdited)) {
        shown.unshift(slots[lastEdited]); // the field just changed comes first
      }
      for (const t of shown) {
        setText(t.err, t.err.textContent ? `${t.err.textContent}; ${text}` : text);
        t.wrap.classList.add('invalid');
      }
      first = first || shown[0].wrap;
    }
    if (!err.fieldErrors().length) loose.push(err.message);
    if (loose.length) {
      setText(formError, loose.join('\n'));
      formError.hidden = false;
    }
    return first;
  }

  function markRelevance(spec) {
    for (const [name, test] of Object.entries(RELEVANT)) {
      slots[name].wrap.classList.toggle('idle', !test(spec));
    }
    // A sweep sets k from each k·n (n kept per worker): the form's k is not used.
    slots.workers.wrap.classList.toggle('idle', isSweep());
    form.classList.toggle('sweeping', isSweep());
    submitBtn.textContent = isSweep() ? 'Start sweep' : 'Start run';
  }

  // ---------- preview ----------
  function onChange(ev) {
    const edited = ev?.target?.name;
    if (edited && inputs[edited]) {
      if (edited === 'epochs' && ev.type === 'input') followEpochs();
      lastEdited = edited;
    }
    const spec = readSpec();
    markRelevance(spec);
    saveQuery(spec);
    if (isSweep()) {
      const sizes = parseBatchSizes(sizesInput.value);
      // Typing "auto" ticks the box (the box's own click fires `input` before its change).
      if (ev?.target === sizesInput || !ev) autoBox.checked = sizesAuto();
      sizesInput.readOnly = autoBox.checked;
      if (sizesAuto()) {
        const every = spec.noise_every;
        setText(sizesEcho, `auto: a geometric ladder around the baseline’s measured noise scale, planned when the baseline finishes${every === 0 ? ' — needs noise_every > 0' : ''}.`);
      } else {
        setText(sizesEcho, sizes.length ? `${sizes.length} sizes: ${sizes.map((s) => (typeof s === 'number' ? formatKn(s) : s)).join(', ')}` : '');
      }
    }
    clearTimeout(previewTimer);
    previewTimer = setTimeout(preview, DEBOUNCE_MS);
  }

  /** Milestones still at the scaled default of the old epochs follow the new epochs. */
  let epochsShown = Number(defaultSpec().epochs);
  function followEpochs() {
    const epochs = Number(inputs.epochs.value);
    const ms = inputs.milestones;
    if (ms.value === paperMilestones(epochsShown).join(', ') && Number.isInteger(epochs) && epochs >= 1) {
      ms.value = paperMilestones(epochs).join(', ');
    }
    if (Number.isInteger(epochs) && epochs >= 1) epochsShown = epochs;
  }

  /** The body of POST /api/runs or /api/sweeps; the plan preview takes the same one. */
  function body() {
    const b = { name: nameInput.value.trim() || undefined, spec: readSpec(), baseline: baselineBox.checked };
    const seeds = seedsInput.value.split(/[\s,;]+/).filter(Boolean).map(parseNumber);
    const sizes = sizesAuto() ? 'auto' : parseBatchSizes(sizesInput.value);
    return isSweep() ? { ...b, batch_sizes: sizes, seeds } : b;
  }

  async function preview() {
    if (stopped) return;
    if (previewAbort) previewAbort.abort();
    const abort = new AbortController();
    previewAbort = abort;
    const opts = { prompt: false, signal: abort.signal };
    // The server plans the runs (sizes, baselines); a 422 names the form's fields.
    let plan;
    try {
      plan = await request('POST', `/api/plan/${isSweep() ? 'sweep' : 'run'}`, body(), opts);
    } catch (err) {
      if (abort.signal.aborted || stopped) return;
      if (err instanceof ApiError && err.status === 422) {
        showErrors(err);
        setText(previewNote, 'Fix the highlighted fields to see the schedule.');
        chart.classList.add('stale');
      } else {
        setText(previewNote, `Preview unavailable: ${err.message || err}`);
      }
      return;
    }
    // One curve per total batch (seeds share a schedule), the baselines dotted and last.
    const seen = new Set();
    const runs = plan.runs.filter((r) => !seen.has(r.derived.total_batch) && seen.add(r.derived.total_batch));
    const sized = runs.filter((r) => !r.is_baseline);
    const curves = [
      ...sized.slice(0, MAX_SWEEP_PREVIEW).map((r, i) => ({
        spec: r.spec,
        label: isSweep() ? `kn=${formatKn(r.derived.total_batch)}` : 'this run',
        color: colorAt(i),
      })),
      ...runs.filter((r) => r.is_baseline).map((r) => ({ spec: r.spec, label: 'baseline', color: BASELINE_COLOR, baseline: true })),
    ];
    const settled = await Promise.allSettled(curves.map((c) => api.schedule(c.spec, opts)));
    if (stopped || abort.signal.aborted) return;
    clearErrors();
    chart.classList.remove('stale');
    const ok = [];
    const isQueueWarning = (w) => w.startsWith('no live worker serves queue');
    const queueNotes = plan.warnings.filter(isQueueWarning);
    setText(queueWarn, queueNotes.join('\n'));
    queueWarn.hidden = queueNotes.length === 0;
    const notes = [...plan.errors.map((e) => e.msg), ...plan.warnings.filter((w) => !isQueueWarning(w))];
    settled.forEach((r, i) => {
      if (r.status === 'fulfilled') ok.push({ ...curves[i], answer: r.value });
      else notes.push(`${curves[i].label}: ${r.reason?.message || r.reason}`);
    });
    if (sized.length > MAX_SWEEP_PREVIEW) notes.push(`first ${MAX_SWEEP_PREVIEW} sizes drawn`);
    setText(previewNote, notes.join('\n'));
    renderStats(isSweep() ? ok : ok.slice(0, 1));
    await draw(ok);
  }

  /** Derived figures: one line for a run, a small table for a sweep. */
  function renderStats(list) {
    if (list.length === 1) {
      const a = list[0].answer;
      const rows = [
        ['k·n', formatKn(a.total_batch)],
        ['peak LR', num(a.peak_lr, 4)],
        ['iters / epoch', a.iters_per_epoch],
        ['iterations', a.total_iters],
        ['warmup iters', a.warmup_iters],
      ];
      replace(stats, h('dl', { class: 'stats' }, rows.map(([k, v]) => [h('dt', null, k), h('dd', { dataset: { stat: k } }, String(v))])));
      return;
    }
    replace(
      stats,
      h(
        'table',
        { class: 'grid compact' },
        h('thead', null, h('tr', null, ['k·n', 'k × n', 'peak LR', 'iters/epoch', 'iterations'].map((t) => h('th', null, t)))),
        h(
          'tbody',
          null,
          list.map((c) =>
            h(
              'tr',
              null,
              h('td', null, formatKn(c.answer.total_batch)),
              h('td', null, `${c.spec.workers} × ${c.spec.batch_per_worker}`),
              h('td', { class: 'num' }, num(c.answer.peak_lr, 4)),
              h('td', { class: 'num' }, String(c.answer.iters_per_epoch)),
              h('td', { class: 'num' }, String(c.answer.total_iters)),
            ),
          ),
        ),
      ),
    );
  }

  async function draw(curves) {
    const Plotly = await loadPlotly();
    if (stopped) return;
    const traces = curves.map((c) => ({
      type: 'scatter',
      mode: 'lines',
      name: c.label,
      x: c.answer.epoch,
      y: c.answer.lr,
      customdata: c.answer.step,
      line: { color: c.color, width: c.baseline ? 1.5 : 2, dash: c.baseline ? 'dot' : 'solid', shape: 'linear' },
      hovertemplate: `%{y:.4g} at epoch %{x:.2f} (iteration %{customdata})<extra>${c.label}</extra>`,
    }));
    const layout = baseLayout({
      margin: { l: 48, r: 8, t: traces.length > 1 ? 26 : 8, b: 36 },
      showlegend: traces.length > 1,
      legend: { orientation: 'h', y: 1, yanchor: 'bottom', x: 0, font: { size: 11 } },
      hovermode: 'closest',
      xaxis: axis({ title: { text: 'epoch' }, rangemode: 'tozero' }),
      yaxis: axis({ title: { text: 'learning rate' }, rangemode: 'tozero' }),
      uirevision: 'keep',
    });
    await Plotly.react(chart, traces, layout, { ...PLOT_CONFIG, displayModeBar: false });
    plotted = true;
    announceDrawn({ view: 'new', traces: traces.length });
  }

  // ---------- submit ----------
  async function onSubmit(ev) {
    ev.preventDefault();
    clearTimeout(previewTimer);
    submitBtn.disabled = true;
    try {
      if (isSweep()) go(`sweep/${(await api.createSweep(body())).sweep.id}`);
      else go(`run/${(await api.createRun(body())).run.id}`);
    } catch (err) {
      if (stopped) return;
      if (err instanceof ApiError && err.status === 422) {
        const first = showErrors(err);
        if (first) {
          first.scrollIntoView({ block: 'center', behavior: 'instant' });
          first.querySelector('input,select')?.focus();
        }
      } else {
        setText(formError, `Could not start: ${err.message || err}`);
        formError.hidden = false;
      }
    } finally {
      submitBtn.disabled = false;
    }
  }

  // ---------- start ----------
  let initial = loadQuery(route.query);
  const from = route.query.get('from');
  if (from) {
    try {
      const run = await api.run(from);
      initial = { ...defaultSpec(), ...run.spec };
      nameInput.value = run.name ? `${run.name} (copy)` : '';
    } catch (err) {
      setText(formError, `Could not load run ${from}: ${err.message || err}`);
      formError.hidden = false;
    }
  }
  setInputs(initial);
  epochsShown = Number(initial.epochs);
  if (route.query.get('mode') === 'sweep') modeSweep.checked = true;
  if (route.query.has('batch_sizes')) sizesInput.value = route.query.get('batch_sizes');
  if (route.query.has('seeds')) seedsInput.value = route.query.get('seeds');
  if (route.query.has('name')) nameInput.value = route.query.get('name');
  baselineBox.checked = route.query.get('baseline') === '1';
  onChange();

  return () => {
    stopped = true;
    clearTimeout(previewTimer);
    if (previewAbort) previewAbort.abort();
    if (plotted) purge(chart);
  };
}
