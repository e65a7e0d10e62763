// #/runs?status=&group=&q= : the table of runs, refreshed every 2 s, with selection for
// Compare. Rows are keyed by run id and updated in place, so a poll never resets a
// checkbox or the scroll position.

import { api } from './api.js';
import { h, replace, setText } from './escape.js';
import { derivedOf, duration, formatKn, num, pct, shortTime, TERMINAL, where } from './format.js';
import { go, href, replaceQuery } from './router.js';

const POLL_MS = 2000;
const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'diverged', 'cancelled'];

export async function mount(root, route) {
  const state = {
    status: route.query.get('status') || '',
    group: route.query.get('group') || '',
    q: route.query.get('q') || '',
  };
  const selected = new Set();
  const rows = new Map(); // run id -> {tr, cells, run}
  let groups = [];
  let timer = null;
  let stopped = false;
  let seq = 0; // only the latest refresh may touch the table or schedule the next one

  const statusSel = h(
    'select',
    { name: 'status', title: 'status', onchange: () => setFilter('status', statusSel.value) },
    h('option', { value: '' }, 'any status'),
    STATUSES.map((s) => h('option', { value: s }, s)),
  );
  statusSel.value = state.status;
  const groupSel = h('select', {
    name: 'group',
    title: 'group or sweep',
    onchange: () => setFilter('group', groupSel.value),
  });
  const search = h('input', {
    type: 'search',
    name: 'q',
    placeholder: 'filter by name',
    value: state.q,
    oninput: () => {
      state.q = search.value;
      saveQuery();
      applyVisibility();
    },
  });
  const compareBtn = h('button', { class: 'primary', disabled: true, onclick: openCompare }, 'Compare');
  const selInfo = h('span', { class: 'muted' });
  const errorBox = h('p', { class: 'error', hidden: true });
  const allBox = h('input', {
    type: 'checkbox',
    title: 'select all shown',
    onchange: () => {
      for (const [id, r] of rows) {
        if (r.tr.hidden) continue;
        if (allBox.checked) selected.add(id);
        else selected.delete(id);
        r.check.checked = allBox.checked;
      }
      updateSelection();
    },
  });
  const tbody = h('tbody');
  const empty = h(
    'p',
    { class: 'empty', hidden: true },
    'No runs here yet. ',
    h('a', { href: '#/new' }, 'Start one'),
    '.',
  );
  const table = h(
    'table',
    { class: 'grid runs' },
    h(
      'thead',
      null,
      h(
        'tr',
        null,
        h('th', { class: 'sel' }, allBox),
        h('th', { class: 'num' }, 'id'),
        h('th', null, 'name'),
        h('th', null, 'status'),
        h('th', null, 'progress'),
        h('th', { class: 'num', title: 'workers' }, 'k'),
        h('th', { class: 'num', title: 'batch per worker' }, 'n'),
        h('th', { class: 'num', title: 'total batch' }, 'k·n'),
        h('th', { class: 'num', title: 'peak learning rate' }, 'peak LR'),
        h('th', null, 'warmup'),
        h('th', null, 'norm'),
        h('th', { class: 'num', title: 'final validation error' }, 'val err'),
        h('th', null, 'group'),
        h('th', null, 'where'),
        h('th', null, 'created'),
      ),
    ),
    tbody,
  );

  replace(
    root,
    h(
      'section',
      { class: 'view runs-view' },
      h(
        'div',
        { class: 'toolbar' },
        h('h1', null, 'Runs'),
        statusSel,
        groupSel,
        search,
        h('span', { class: 'spacer' }),
        selInfo,
        compareBtn,
        h('a', { class: 'button', href: '#/new' }, 'New run'),
      ),
      errorBox,
      h('div', { class: 'table-wrap' }, table),
      empty,
    ),
  );

  function saveQuery() {
    replaceQuery({ status: state.status, group: state.group, q: state.q });
  }

  function setFilter(key, value) {
    state[key] = value;
    saveQuery();
    refresh(true);
  }

  function fillGroups() {
    const current = state.group;
    replace(
      groupSel,
      h('option', { value: '' }, 'any group'),
      groups.map((g) => h('option', { value: String(g.id) }, `${g.kind} ${g.id}: ${g.name || ''}`)),
    );
    // A group from the URL that is not listed yet still filters (and shows as selected).
    if (current && !groups.some((g) => String(g.id) === current)) {
      groupSel.append(h('option', { value: current }, `group ${current}`));
    }
    groupSel.value = current;
  }

  function openCompare() {
    const ids = [...selected].sort((a, b) => a - b);
    const runs = ids.map((id) => rows.get(id)?.run).filter(Boolean);
    // Baseline: a selected run marked as one, else a selected run the others point to.
    const marked = runs.find((r) => r.is_baseline);
    const pointed = runs.find((r) => runs.some((o) => o.baseline_id === r.id));
    const baseline = (marked || pointed)?.id;
    go('compare', { runs: ids, baseline });
  }

  function updateSelection() {
    for (const id of [...selected]) if (!rows.has(id)) selected.delete(id);
    compareBtn.disabled = selected.size === 0;
    setText(selInfo, selected.size ? `${selected.size} selected` : '');
  }

  function applyVisibility() {
    const q = state.q.trim().toLowerCase();
    let shown = 0;
    for (const r of rows.values()) {
      const hide = q !== '' && !String(r.run.name ?? '').toLowerCase().includes(q);
      r.tr.hidden = hide;
      if (!hide) shown++;
    }
    empty.hidden = shown > 0;
  }

  function makeRow(run) {
    const check = h('input', {
      type: 'checkbox',
      title: 'select for Compare',
      onchange: () => {
        if (check.checked) selected.add(run.id);
        else selected.delete(run.id);
        updateSelection();
      },
    });
    const cells = {};
    const td = (key, cls) => {
      cells[key] = h('td', cls ? { class: cls } : null);
      return cells[key];
    };
    const tr = h(
      'tr',
      { dataset: { runId: String(run.id) } },
      h('td', { class: 'sel' }, check),
      td('id', 'num'),
      td('name', 'name'),
      td('status'),
      td('progress', 'prog'),
      td('k', 'num'),
      td('n', 'num'),
      td('kn', 'num'),
      td('lr', 'num'),
      td('warmup'),
      td('norm'),
      td('err', 'num'),
      td('group'),
      td('where'),
      td('created'),
    );
    const link = h('a', { href: `#/run/${run.id}` });
    cells.name.append(link);
    cells.nameLink = link;
    const badge = h('span', { class: 'badge' });
    cells.status.append(badge);
    cells.badge = badge;
    const bar = h('span', { class: 'fill' });
    const barText = h('span', { class: 'bar-text' });
    cells.progress.append(h('span', { class: 'progress' }, h('span', { class: 'bar' }, bar), barText));
    cells.bar = bar;
    cells.barText = barText;
    return { tr, cells, check, run, key: '' };
  }

  function updateRow(r, run) {
    // Skip rows whose visible fields did not change since the last poll.
    const key = JSON.stringify([run.status, run.progress, run.eta_s, run.summary?.final_val_err,
      run.host, run.gpus, run.name, run.group_id, run.is_baseline, run.error]);
    r.run = run;
    if (key === r.key) return;
    r.key = key;
    const c = r.cells;
    const spec = run.spec || {};
    const { kn, peak } = derivedOf(run);
    setText(c.id, run.id);
    setText(c.nameLink, run.name || `run ${run.id}`);
    c.nameLink.title = run.error ? `error: ${run.error}` : run.name || '';
    if (run.is_baseline && !c.name.querySelector('.tag')) {
      c.name.append(' ', h('span', { class: 'tag', title: 'baseline run' }, 'baseline'));
    }
    setText(c.badge, run.status);
    c.badge.className = `badge s-${run.status}`;
    const progress = Math.max(0, Math.min(1, run.progress ?? (run.status === 'succeeded' ? 1 : 0)));
    c.bar.style.width = `${(100 * progress).toFixed(1)}%`;
    c.progress.classList.toggle('live', run.status === 'running');
    let text = '';
    if (run.status === 'running') {
      text = `${Math.round(100 * progress)}%${run.eta_s != null ? ` · ETA ${duration(run.eta_s)}` : ''}`;
    } else if (TERMINAL.has(run.status) && run.started_at && run.finished_at) {
      text = duration((new Date(run.finished_at) - new Date(run.started_at)) / 1000);
    }
    setText(c.barText, text);
    setText(c.k, spec.workers ?? '');
    setText(c.n, spec.batch_per_worker ?? '');
    setText(c.kn, formatKn(kn));
    setText(c.lr, num(peak));
    setText(c.warmup, spec.warmup ? `${spec.warmup}${spec.warmup !== 'none' ? ` ${num(spec.warmup_epochs)}e` : ''}` : '');
    setText(c.norm, spec.norm ?? '');
    setText(c.err, pct(run.summary?.final_val_err));
    if (run.group_id != null) {
      const g = groups.find((x) => x.id === run.group_id);
      const target = g && g.kind === 'sweep'
        ? `#/sweep/${run.group_id}`
        : href('compare', { group: run.group_id });
      replace(c.group, h('a', { href: target }, `${g ? g.kind : 'group'} ${run.group_id}`));
    } else replace(c.group);
    setText(c.where, where(run));
    setText(c.created, shortTime(run.created_at));
    c.created.title = run.created_at || '';
  }

  async function refresh(resetRows = false) {
    if (stopped) return;
    const mine = ++seq;
    clearTimeout(timer);
    try {
      const filter = { status: state.status, group: state.group };
      const [runs, gs] = await Promise.all([
        api.runs(filter),
        groups.length && !resetRows ? Promise.resolve(groups) : api.sweeps().catch(() => []),
      ]);
      if (stopped || mine !== seq) return;
      if (gs !== groups) {
        groups = gs;
        fillGroups();
      }
      if (resetRows) {
        rows.clear();
        tbody.replaceChildren();
      }
      const seen = new Set();
      runs.forEach((run, i) => {
        seen.add(run.id);
        let r = rows.get(run.id);
        if (!r) {
          r = makeRow(run);
          r.check.checked = selected.has(run.id);
          rows.set(run.id, r);
        }
        updateRow(r, run);
        // Keep server order (newest first) while moving as few nodes as possible.
        if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
      });
      for (const [id, r] of rows) {
        if (!seen.has(id)) {
          r.tr.remove();
          rows.delete(id);
        }
      }
      updateSelection();
      applyVisibility();
      errorBox.hidden = true;
    } catch (err) {
      if (stopped || mine !== seq) return;
      setText(errorBox, `Could not load runs: ${err.message || err}`);
      errorBox.hidden = false;
    }
    schedule();
  }

  function schedule() {
    if (stopped) return;
    timer = setTimeout(() => (document.hidden ? schedule() : refresh()), POLL_MS);
  }

  await refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
