// Entry point: mounts the view of the current hash route and unmounts the previous one.
// A view module exports mount(root, route) and returns a cleanup function (or a promise
// of one) that stops its timers, streams and plots.

import { api } from './api.js';
import { h, replace, setText } from './escape.js';
import { loadPlotly } from './plots.js';
import { parseHash } from './router.js';

const VIEWS = {
  runs: () => import('./runs.js'),
  new: () => import('./newrun.js'),
  run: () => import('./run.js'),
  compare: () => import('./compare.js'),
  sweep: () => import('./sweep.js'),
  parallel: () => import('./parallel.js'),
  workers: () => import('./workers.js'),
};

const root = document.getElementById('view');
let cleanup = null;
let generation = 0;

async function render() {
  const route = parseHash();
  const mine = ++generation;
  if (cleanup) {
    const done = cleanup;
    cleanup = null;
    try {
      await done();
    } catch (err) {
      console.error(err);
    }
  }
  for (const a of document.querySelectorAll('header nav a')) {
    a.classList.toggle('active', a.dataset.route === route.name);
  }
  const load = VIEWS[route.name];
  if (!load) {
    replace(root, h('p', { class: 'error' }, `No page "${route.name}".`), ' ', h('a', { href: '#/runs' }, 'Runs'));
    return;
  }
  replace(root);
  try {
    const view = await load();
    if (mine !== generation) return; // the user navigated on meanwhile
    const result = await view.mount(root, route);
    if (mine !== generation) {
      if (typeof result === 'function') result();
      return;
    }
    cleanup = typeof result === 'function' ? result : null;
  } catch (err) {
    console.error(err);
    if (mine === generation) replace(root, h('p', { class: 'error' }, String(err.message || err)));
  }
}

/** The header's service light: database, broker and the workers connected (a link to
 * #/workers, index.html). */
async function pollHealth() {
  const el = document.getElementById('health');
  try {
    const [health, workers] = await Promise.all([api.health(), api.workers().catch(() => null)]);
    const ok = health.database === 'ok' && health.broker === 'ok';
    const live = workers ? workers.workers.filter((w) => w.alive !== false).length : null;
    el.className = `health ${ok ? 'ok' : 'bad'}`;
    setText(el, `${ok ? 'ok' : 'degraded'}${live == null ? '' : ` · ${live} worker${live === 1 ? '' : 's'}`}`);
    el.title = `database: ${health.database}, broker: ${health.broker}, version ${health.version ?? '?'}`;
  } catch (err) {
    el.className = 'health bad';
    setText(el, 'offline');
    el.title = String(err.message || err);
  }
}

window.addEventListener('hashchange', render);
// Views with plots load Plotly themselves once their data requests are on the way (its
// compile blocks the main thread for a while). The runs table needs none: compile it in
// idle time after the table is up, so the first chart opens instantly.
// The header's health light waits for the first view too: it is not on the critical path.
render().then(() => {
  pollHealth();
  (window.requestIdleCallback || setTimeout)(() => loadPlotly().catch(() => {}));
});
setInterval(() => {
  if (!document.hidden) pollHealth();
}, 10000);
