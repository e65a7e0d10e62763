// #/runs?status=&group=&q=&tag=&archived=all|only&sort=[-]COL&cols=F1,s.F2 : the table of
// runs, refreshed every 2 s. Every filter, the sort and the extra columns live in the URL,
// so a link reproduces the table. Rows are keyed by run id and updated in place, so a
// poll never resets a checkbox or the scroll position. Selected rows take bulk actions
// (compare, parallel coordinates, tag, archive, delete) through POST /api/runs/bulk.

import { api } from './api.js';
import { h, replace, setText } from './escape.js';
import { derivedOf, duration, formatKn, num, pct, shortTime, STATUSES, TERMINAL, where } from './format.js';
import { go, href, replaceQuery } from './router.js';
import { BASE_COLUMNS, cellText, extraColumn, matches, sortBy, SUMMARY_KEYS, TAIL_COLUMNS } from './runs_columns.js';
import { FIELDS } from './spec_fields.js';

const POLL_MS = 2000;
const SEARCH_DEBOUNCE_MS = 300;
const ARCHIVED = { '': 'active runs', all: 'with archived', only: 'archived only' };
function readState(query) {
  const archived = query.get('archived') || '';
  return {
    status: query.get('status') || '',
    group: query.get('group') || '',
    q: query.get('q') || '',
    tag: query.get('tag') || '',
    archived: archived in ARCHIVED ? archived : '',
    sort: query.get('sort') || '',
    cols: (query.get('cols') || '').split(',').filter(Boolean),
  };
}

export async function mount(root, route) {
  const state = readState(route.query);
  const selected = new Set();
  const rows = new Map(); // run id -> {tr, cells, run}
  const knownTags = new Set();
  const knownSummary = new Set(SUMMARY_KEYS);
  let columns = [];
  let groups = [];
  let lastRuns = [];
  let timer = null;
  let searchTimer = null;
  let stopped = false;
  let seq = 0; // only the latest refresh may touch the table or schedule the next one

  // ---------- filters ----------
  const statusSel = h(
    'select',
    { name: 'status', title: 'status', onchange: () => setFilter('status', statusSel.value) },
    h('option', { value: '' }, 'any status'),
    STATUSES.map((s) => h('option', { value: s }, s)),
  );
  statusSel.value = state.status;
  const groupSel = h('select', { name: 'group', title: 'group or sweep', onchange: () => setFilter('group', groupSel.value) });
  const tagSel = h('select', { name: 'tag', title: 'tag', onchange: () => setFilter('tag', tagSel.value) });
  const archivedSel = h(
    'select',
    { name: 'archived', title: 'archived runs are hidden unless shown here', onchange: () => setFilter('archived', archivedSel.value) },
    Object.entries(ARCHIVED).map(([v, t]) => h('option', { value: v }, t)),
  );
  archivedSel.value = state.archived;
  const search = h('input', {
    type: 'search',
    name: 'q',
    placeholder: 'search name, tags, notes',
    value: state.q,
    oninput: () => {
      state.q = search.value;
      saveQuery();
      applyVisibility();
      // The server searches too (its list is capped): read again once typing pauses.
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => refresh(), SEARCH_DEBOUNCE_MS);
    },
  });
  const csvLink = h('a', { class: 'button', download: '', title: 'this table (same filters) as CSV' }, 'download CSV');
  const colMenuBody = h('div', { class: 'menu-body' });
  const colMenu = h('details', { class: 'menu columns-menu', ontoggle: () => colMenu.open && fillColumnMenu() }, h('summary', null, 'columns ▾'), colMenuBody);

  // ---------- selection and bulk actions ----------
  const selInfo = h('span', { class: 'sel-info' });
  const tagInput = h('input', { type: 'text', name: 'bulk-tag', placeholder: 'tag', onkeydown: (ev) => ev.key === 'Enter' && bulk('tag') });
  const bulkBar = h(
    'div',
    { class: 'bulk', hidden: true },
    h('button', { class: 'primary', name: 'compare', onclick: openCompare }, 'Compare'),
    h('button', { name: 'parallel', onclick: () => go('parallel', { runs: sortedSelection() }) }, 'Parallel coordinates'),
    tagInput,
    h('button', { name: 'tag', onclick: () => bulk('tag') }, 'Tag'),
    h('button', { name: 'untag', onclick: () => bulk('untag') }, 'Untag'),
    h('button', { name: 'archive', onclick: () => bulk('archive') }, 'Archive'),
    h('button', { name: 'unarchive', onclick: () => bulk('unarchive') }, 'Unarchive'),
    h('button', { class: 'danger', name: 'delete', onclick: () => bulk('delete') }, 'Delete'),
    h('button', { class: 'link', name: 'clear', onclick: clearSelection }, 'clear selection'),
  );
  const resultBox = h('p', { class: 'notice', hidden: true });
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
  const headRow = h('tr');
  const tbody = h('tbody');
  const empty = h('p', { class: 'empty', hidden: true });
  const table = h('table', { class: 'grid runs' }, h('thead', null, headRow), tbody);

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
        tagSel,
        archivedSel,
        search,
        h('span', { class: 'spacer' }),
        selInfo,
        colMenu,
        csvLink,
        h('a', { class: 'button', href: '#/new' }, 'New run'),
      ),
      bulkBar,
      resultBox,
      errorBox,
      h('div', { class: 'table-wrap' }, table),
      empty,
    ),
  );

  function saveQuery() {
    const { status, group, q, tag, archived, sort, cols } = state;
    replaceQuery({ status, group, q, tag, archived, sort, cols });
    csvLink.href = api.runsCsvUrl({ status, group, q, tag, archived });
  }

  function setFilter(key, value) {
    state[key] = value;
    saveQuery();
    // A chip sets the tag filter from outside its menu: the menus show the state at once.
    fillTags();
    statusSel.value = state.status;
    archivedSel.value = state.archived;
    refresh(true);
  }

  // ---------- columns and sorting ----------
  function buildHeader() {
    columns = [...BASE_COLUMNS, ...state.cols.map(extraColumn), ...TAIL_COLUMNS];
    const [desc, sortId] = state.sort.startsWith('-') ? [true, state.sort.slice(1)] : [false, state.sort];
    replace(
      headRow,
      h('th', { class: 'sel' }, allBox),
      columns.map((c) =>
        h(
          'th',
          {
            class: `sortable${c.num ? ' num' : ''}`,
            title: `${c.title || c.label}: click to sort`,
            dataset: { col: c.id },
            'aria-sort': c.id === sortId ? (desc ? 'descending' : 'ascending') : null,
            onclick: () => {
              // Ascending first, then descending, then back to ascending.
              state.sort = state.sort === c.id ? `-${c.id}` : c.id;
              saveQuery();
              buildHeader();
              placeRows(lastRuns);
            },
          },
          c.label,
        ),
      ),
    );
  }

  function setColumns(cols) {
    state.cols = cols;
    saveQuery();
    buildHeader();
    rows.clear();
    tbody.replaceChildren();
    placeRows(lastRuns);
  }

  function fillColumnMenu() {
    for (const r of lastRuns) for (const k of Object.keys(r.summary || {})) knownSummary.add(k);
    const box = (id, label) =>
      h(
        'label',
        null,
        h('input', {
          type: 'checkbox',
          name: `col-${id}`,
          checked: state.cols.includes(id),
          onchange: (ev) => setColumns(ev.target.checked ? [...state.cols, id] : state.cols.filter((c) => c !== id)),
        }),
        label,
      );
    replace(
      colMenuBody,
      h('h3', null, 'spec fields'),
      FIELDS.map((f) => box(f.name, f.name)),
      h('h3', null, 'summary figures'),
      [...knownSummary].sort().map((k) => box(`s.${k}`, k)),
    );
  }

  const sortRuns = (runs) => sortBy(runs, state.sort, columns);

  // ---------- menus ----------
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

  function fillTags() {
    if (state.tag) knownTags.add(state.tag);
    const tags = [...knownTags].sort();
    if (tagSel.options.length === tags.length + 1 && tagSel.value === state.tag) return;
    replace(tagSel, h('option', { value: '' }, 'any tag'), tags.map((t) => h('option', { value: t }, t)));
    tagSel.value = state.tag;
  }

  // ---------- selection ----------
  function sortedSelection() {
    return [...selected].sort((a, b) => a - b);
  }

  function openCompare() {
    const ids = sortedSelection();
    const runs = ids.map((id) => rows.get(id)?.run).filter(Boolean);
    // Baseline: a selected run marked as one, else a selected run the others point to.
    const marked = runs.find((r) => r.is_baseline);
    const pointed = runs.find((r) => runs.some((o) => o.baseline_id === r.id));
    const baseline = (marked || pointed)?.id;
    go('compare', { runs: ids, baseline });
  }

  function clearSelection() {
    selected.clear();
    for (const r of rows.values()) r.check.checked = false;
    allBox.checked = false;
    updateSelection();
  }

  function updateSelection() {
    for (const id of [...selected]) if (!rows.has(id)) selected.delete(id);
    bulkBar.hidden = selected.size === 0;
    setText(selInfo, selected.size ? `${selected.size} selected` : '');
  }

  async function bulk(action) {
    const ids = sortedSelection();
    if (!ids.length) return;
    let tags;
    if (action === 'tag' || action === 'untag') {
      tags = tagInput.value.split(',').map((t) => t.trim()).filter(Boolean);
      if (!tags.length) {
        tagInput.focus();
        return;
      }
    }
    // One confirmation for the whole selection.
    if (action === 'delete' && !window.confirm(`Delete ${ids.length} run${ids.length === 1 ? '' : 's'} (${ids.join(', ')}) and their metrics? This cannot be undone.`)) {
      return;
    }
    try {
      const res = await api.bulk(ids, action, tags);
      const done = res?.done?.length ?? ids.length;
      const past = { archive: 'Archived', unarchive: 'Restored', delete: 'Deleted', tag: 'Tagged', untag: 'Untagged' }[action];
      const missing = res?.missing?.length ? ` (${res.missing.join(', ')} not found)` : '';
      setText(resultBox, `${past} ${done} run${done === 1 ? '' : 's'}${missing}.`);
      resultBox.hidden = false;
      if (action === 'tag') for (const t of tags) knownTags.add(t);
      if (action === 'delete' || action === 'archive' || action === 'unarchive') clearSelection();
      await refresh(true);
    } catch (err) {
      setText(errorBox, `${action} failed: ${err.message || err}`);
      errorBox.hidden = false;
    }
  }

  // ---------- rows ----------
  function visible(run) {
    if (state.archived === '' && run.archived) return false;
    if (state.archived === 'only' && !run.archived) return false;
    if (state.tag && !(run.tags || []).includes(state.tag)) return false;
    return matches(run, state.q);
  }

  function applyVisibility() {
    let shown = 0;
    for (const r of rows.values()) {
      const hide = !visible(r.run);
      r.tr.hidden = hide;
      if (!hide) shown++;
    }
    empty.hidden = shown > 0;
    const filtered = state.q || state.tag || state.status || state.group || state.archived === 'only';
    replace(
      empty,
      filtered ? 'No runs match these filters. ' : 'No runs here yet. ',
      filtered ? h('a', { href: '#/runs' }, 'Show all runs') : h('a', { href: '#/new' }, 'Start one'),
      '.',
    );
  }

  function makeRow(run) {
    const check = h('input', {
      type: 'checkbox',
      title: 'select',
      onchange: () => {
        if (check.checked) selected.add(run.id);
        else selected.delete(run.id);
        updateSelection();
      },
    });
    const cells = {};
    const tr = h(
      'tr',
      { dataset: { runId: String(run.id) } },
      h('td', { class: 'sel' }, check),
      columns.map((c) => {
        const cls = [c.num ? 'num' : '', c.id === 'name' ? 'name' : '', c.id === 'progress' ? 'prog' : ''].filter(Boolean).join(' ');
        cells[c.id] = h('td', { class: cls || null, dataset: { col: c.id } });
        return cells[c.id];
      }),
    );
    const link = h('a', { href: `#/run/${run.id}` });
    const extras = h('span', { class: 'name-extras' });
    cells.name.append(link, extras);
    cells.nameLink = link;
    cells.nameExtras = extras;
    const badge = h('span', { class: 'badge' });
    const why = h('span', { class: 'waiting', style: { color: 'var(--warn)' } });
    cells.status.append(badge, why);
    cells.badge = badge;
    cells.why = why;
    const bar = h('span', { class: 'fill' });
    const barText = h('span', { class: 'bar-text' });
    cells.progress.append(h('span', { class: 'progress' }, h('span', { class: 'bar' }, bar), barText));
    cells.bar = bar;
    cells.barText = barText;
    return { tr, cells, check, run, key: '' };
  }

  function nameExtras(run) {
    return [
      run.is_baseline ? [' ', h('span', { class: 'tag', title: 'baseline run' }, 'baseline')] : '',
      run.parent_id != null ? [' ', h('a', { class: 'muted small', href: `#/run/${run.parent_id}`, title: 'extends this run' }, `↳ ${run.parent_id}`)] : '',
      (run.tags || []).map((t) =>
        h('span', {
          class: `chip${t === state.tag ? ' active' : ''}`,
          title: t === state.tag ? 'show every tag' : `only runs tagged ${t}`,
          dataset: { tag: t },
          onclick: () => setFilter('tag', t === state.tag ? '' : t),
        }, t),
      ),
    ];
  }

  function updateRow(r, run) {
    // Skip rows whose visible fields did not change since the last poll.
    const key = JSON.stringify([run.status, run.progress, run.eta_s, run.summary, run.host, run.gpus,
      run.name, run.group_id, run.is_baseline, run.error, run.waiting_for, run.device, run.tags,
      run.notes, run.archived, run.parent_id, state.tag, groups.length]);
    r.run = run;
    if (key === r.key) return;
    r.key = key;
    const c = r.cells;
    const spec = run.spec || {};
    const { kn, peak } = derivedOf(run);
    r.tr.classList.toggle('archived', Boolean(run.archived));
    setText(c.id, run.id);
    setText(c.nameLink, run.name || `run ${run.id}`);
    c.nameLink.title = [run.error && `error: ${run.error}`, run.notes, run.archived && '(archived)'].filter(Boolean).join('\n') || run.name || '';
    replace(c.nameExtras, nameExtras(run));
    setText(c.badge, run.status);
    c.badge.className = `badge s-${run.status}`;
    // A queued run nobody will take says why: "queued — no live worker serves queue gpu".
    setText(c.why, run.waiting_for ? ` — ${run.waiting_for}` : '');
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
    for (const col of columns) if (col.extra) setText(c[col.id], cellText(col, run));
    if (run.group_id != null) {
      const g = groups.find((x) => x.id === run.group_id);
      const target = g && g.kind === 'sweep' ? `#/sweep/${run.group_id}` : href('compare', { group: run.group_id });
      replace(c.group, h('a', { href: target }, `${g ? g.kind : 'group'} ${run.group_id}`));
    } else replace(c.group);
    // The device in short ("cuda:0 NVIDIA H200 (139 GiB)"), in full on hover.
    const device = run.device ? run.device.split(',')[0] : '';
    setText(c.where, [where(run), device].filter(Boolean).join(' · '));
    c.where.title = run.device || '';
    setText(c.created, shortTime(run.created_at));
    c.created.title = run.created_at || '';
  }

  /** Put the rows of `runs` in the table in sort order, moving as few nodes as possible. */
  function placeRows(runs) {
    const seen = new Set();
    sortRuns(runs).forEach((run, i) => {
      seen.add(run.id);
      for (const t of run.tags || []) knownTags.add(t);
      let r = rows.get(run.id);
      if (!r) {
        r = makeRow(run);
        r.check.checked = selected.has(run.id);
        rows.set(run.id, r);
      }
      updateRow(r, run);
      if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
    });
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        r.tr.remove();
        rows.delete(id);
      }
    }
    fillTags();
    updateSelection();
    applyVisibility();
  }

  async function refresh(resetRows = false) {
    if (stopped) return;
    const mine = ++seq;
    clearTimeout(timer);
    try {
      const { status, group, q, tag, archived } = state;
      const [runs, gs] = await Promise.all([
        api.runs({ status, group, q, tag, archived }),
        groups.length && !resetRows ? Promise.resolve(groups) : api.sweeps({ kind: 'all' }).catch(() => []),
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
      lastRuns = runs;
      placeRows(runs);
      errorBox.hidden = true;
      document.dispatchEvent(new CustomEvent('batchlab:drawn', { detail: { view: 'runs', rows: runs.length } }));
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

  // The columns menu closes when the user clicks elsewhere, as a menu does.
  const closeMenu = (ev) => {
    if (colMenu.open && !colMenu.contains(ev.target)) colMenu.open = false;
  };
  document.addEventListener('click', closeMenu);

  buildHeader();
  saveQuery();
  await refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    clearTimeout(searchTimer);
    document.removeEventListener('click', closeMenu);
  };
}
