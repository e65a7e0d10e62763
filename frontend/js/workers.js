// #/workers : the service's workers (GET /api/workers), refreshed every 3 s. One row per
// worker: host, queues, GPUs, whether it is alive (and when it was last heard from), the
// run it trains and the node of a multi-node run it holds ("run 12 · node 1 of 2 ·
// running"); then the queue lengths and, for each multi-node run holding nodes, where its
// nodes are ("run 12: node 0 host-a (worker a), node 1 host-b (worker b)").
// The view has no state of its own: "#/workers" is its whole link.
//
// The node helpers (nodeLabel, gangLine, nodesTable, ago) are also the run page's
// (run.js, its "Nodes" section), so a node reads the same on both pages.

import { api } from './api.js';
import { h, replace, setText } from './escape.js';
import { shortTime } from './format.js';

const POLL_MS = 3000;

/** "4 s ago", "3 m ago", "2 h ago", "5 d ago" from an ISO time ("–" when absent). */
export function ago(iso, now = Date.now()) {
  if (!iso) return '–';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return String(iso);
  // A clock a little ahead of the browser's reads as "0 s ago", not a negative age.
  const s = Math.max(0, (now - t) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** "run 12 · node 1 of 2 · running" (without "of N" when the run's size is unknown). */
export function nodeLabel(node, nodes) {
  return `run ${node.run_id} · node ${node.slot}${nodes ? ` of ${nodes}` : ''} · ${node.state}`;
}

/** "node 0 host-a (worker a), node 1 host-b (worker b)": a gang's nodes by slot. */
export function gangLine(gang) {
  return [...gang]
    .sort((a, b) => a.slot - b.slot)
    .map((n) => `node ${n.slot} ${n.host} (worker ${n.worker})`)
    .join(', ');
}

/** A node's address: slot 0 publishes the rendezvous endpoint (addr:port). */
function address(node) {
  return node.endpoint || node.addr || '–';
}

/**
 * The Nodes table of a multi-node run: slot, host, worker, address, state, last beat,
 * error. Rows carry data-slot; every value is a text node.
 */
export function nodesTable(gang, now = Date.now()) {
  const head = ['slot', 'host', 'worker', 'address', 'state', 'last beat', 'error'];
  return h(
    'table',
    { class: 'grid compact nodes' },
    h('thead', null, h('tr', null, head.map((t) => h('th', null, t)))),
    h(
      'tbody',
      null,
      [...gang]
        .sort((a, b) => a.slot - b.slot)
        .map((n) =>
          h(
            'tr',
            { dataset: { slot: String(n.slot), state: n.state } },
            h('td', { class: 'num' }, String(n.slot)),
            h('td', null, n.host),
            h('td', null, n.worker),
            h('td', { class: 'addr', title: n.slot === 0 ? 'rendezvous endpoint' : null }, address(n)),
            h('td', null, h('span', { class: `badge node-${n.state}` }, n.state)),
            h('td', { title: n.beat_at || '' }, ago(n.beat_at, now)),
            h('td', { class: 'error' }, n.error || ''),
          ),
        ),
    ),
  );
}

function queuesText(queues) {
  if (Array.isArray(queues)) return queues.join(', ');
  return queues == null ? '' : String(queues);
}

export async function mount(root) {
  const rows = new Map(); // worker name -> {tr, cells}
  let timer = null;
  let stopped = false;
  let seq = 0; // only the latest refresh may touch the page or schedule the next one

  const tbody = h('tbody');
  const table = h(
    'table',
    { class: 'grid workers' },
    h(
      'thead',
      null,
      h('tr', null, ['name', 'host', 'queues', 'GPUs', 'status', 'training', 'node'].map((t) => h('th', null, t))),
    ),
    tbody,
  );
  const empty = h(
    'p',
    { class: 'empty', hidden: true },
    'No worker has registered with this service yet. Start one with ',
    h('code', null, 'batchlab worker'),
    '.',
  );
  const errorBox = h('p', { class: 'error', hidden: true });
  const queuesBox = h('div', { class: 'queue-lengths' });
  const gangsBox = h('ul', { class: 'gangs' });
  const gangsSection = h('div', { class: 'gangs-section', hidden: true }, h('h2', null, 'Multi-node runs'), gangsBox);

  replace(
    root,
    h(
      'section',
      { class: 'view workers-view' },
      h('div', { class: 'toolbar' }, h('h1', null, 'Workers'), h('span', { class: 'spacer' }), h('a', { class: 'button', href: '#/runs' }, 'Runs')),
      errorBox,
      h('div', { class: 'table-wrap' }, table),
      empty,
      h('h2', null, 'Queues'),
      queuesBox,
      gangsSection,
    ),
  );

  // ---------- the workers table (rows keyed by name, updated in place) ----------
  function rowFor(name) {
    let r = rows.get(name);
    if (!r) {
      const cells = {
        name: h('td', { class: 'name' }),
        host: h('td'),
        queues: h('td'),
        gpus: h('td'),
        status: h('td', { class: 'alive' }),
        training: h('td', { class: 'training' }),
        node: h('td', { class: 'node' }),
      };
      const tr = h('tr', { dataset: { worker: name } }, Object.values(cells));
      r = { tr, cells };
      rows.set(name, r);
    }
    return r;
  }

  /** A cell holding a link (href) or plain text; rebuilt only when either changed. */
  function setLink(td, text, url) {
    const key = `${url ?? ''}\n${text}`;
    if (td.dataset.key === key) return;
    td.dataset.key = key;
    if (url) replace(td, h('a', { href: url }, text));
    else replace(td, text);
  }

  function renderWorkers(workers, runsById, now) {
    const seen = new Set();
    const ordered = [];
    for (const w of workers) {
      seen.add(w.name);
      const { tr, cells } = rowFor(w.name);
      setText(cells.name, w.name);
      setText(cells.host, w.host || '');
      setText(cells.queues, queuesText(w.queues));
      setText(cells.gpus, w.gpus || 'none (CPU)');
      const alive = w.alive !== false;
      tr.classList.toggle('dead', !alive);
      setText(cells.status, `${alive ? 'alive' : 'gone'} · ${ago(w.last_seen, now)}`);
      cells.status.title = w.last_seen ? `last seen ${shortTime(w.last_seen)} (${w.last_seen})` : '';
      setLink(cells.training, w.active == null ? '' : `run ${w.active}`, w.active == null ? null : `#/run/${w.active}`);
      const node = w.node;
      if (node) {
        setLink(cells.node, nodeLabel(node, runsById.get(node.run_id)?.nodes), `#/run/${node.run_id}`);
        cells.node.dataset.state = node.state;
      } else {
        setLink(cells.node, '', null);
        delete cells.node.dataset.state;
      }
      ordered.push(tr);
    }
    for (const name of [...rows.keys()]) if (!seen.has(name)) rows.delete(name);
    // Re-append only when the order or the set of rows changed (keeps selection and focus).
    const current = [...tbody.children];
    if (current.length !== ordered.length || current.some((tr, i) => tr !== ordered[i])) {
      tbody.replaceChildren(...ordered);
    }
    empty.hidden = workers.length > 0;
    table.hidden = workers.length === 0;
  }

  function renderQueues(queues, workers) {
    const served = (q) => workers.filter((w) => w.alive !== false && (w.queues || []).includes(q)).length;
    const names = Object.keys(queues || {}).sort();
    replace(
      queuesBox,
      h(
        'table',
        { class: 'grid compact queues' },
        h('thead', null, h('tr', null, ['queue', 'waiting runs', 'live workers'].map((t) => h('th', null, t)))),
        h(
          'tbody',
          null,
          names.map((q) =>
            h('tr', { dataset: { queue: q } }, h('td', null, q), h('td', { class: 'num' }, String(queues[q])), h('td', { class: 'num' }, String(served(q)))),
          ),
        ),
      ),
    );
  }

  /** Each multi-node run a worker holds a node of: one line naming where its nodes are. */
  function renderGangs(workers, runsById) {
    const ids = [...new Set(workers.filter((w) => w.node).map((w) => w.node.run_id))].sort((a, b) => a - b);
    const lines = ids.map((id) => {
      // The run's own gang lists every slot (also one held by a worker not listed here);
      // without it (deleted meanwhile), the slots the workers report.
      const gang = runsById.get(id)?.gang ?? workers.filter((w) => w.node?.run_id === id).map((w) => w.node);
      return h('li', { dataset: { run: String(id) } }, h('a', { href: `#/run/${id}` }, `run ${id}`), `: ${gangLine(gang)}`);
    });
    replace(gangsBox, lines);
    gangsSection.hidden = lines.length === 0;
  }

  /** The runs whose nodes the workers hold, by id (null entries for runs that failed to read). */
  async function readRuns(workers, mine) {
    const ids = [...new Set(workers.filter((w) => w.node).map((w) => w.node.run_id))];
    const got = await Promise.all(ids.map((id) => api.run(id).catch(() => null)));
    const out = new Map();
    if (stopped || mine !== seq) return out;
    got.forEach((run, i) => run && out.set(ids[i], run));
    return out;
  }

  async function refresh() {
    if (stopped) return;
    const mine = ++seq;
    clearTimeout(timer);
    try {
      const data = await api.workers();
      if (stopped || mine !== seq) return;
      const workers = data.workers || [];
      const runsById = await readRuns(workers, mine);
      if (stopped || mine !== seq) return;
      const now = Date.now();
      renderWorkers(workers, runsById, now);
      renderQueues(data.queues, workers);
      renderGangs(workers, runsById);
      errorBox.hidden = true;
      document.dispatchEvent(new CustomEvent('batchlab:drawn', { detail: { view: 'workers', rows: workers.length } }));
    } catch (err) {
      if (stopped || mine !== seq) return;
      setText(errorBox, `Could not read the workers: ${err.message || err}`);
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
