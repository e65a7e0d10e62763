// Hash routes: #/runs, #/new, #/run/12, #/compare?runs=1,2&baseline=1, #/sweep/3,
// #/sweep (the list of sweeps and comparison groups), #/parallel?runs=1,2,3 (or ?group=3),
// #/workers (the workers, queues and the nodes of multi-node runs).
// Each view keeps its state in the query part, so a copied link reproduces the view.
// Views update that state with replaceQuery(), which does not re-mount the view.

/** {name, id, query} of a hash like "#/run/12?x=epoch" (query is a URLSearchParams). */
export function parseHash(hash = window.location.hash) {
  const raw = hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const path = q < 0 ? raw : raw.slice(0, q);
  const query = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
  const [name = '', id = null] = path.split('/').filter(Boolean);
  return { name: name || 'runs', id, query };
}

/** '#/compare?runs=1,2' from a path and an object or URLSearchParams (empty values dropped). */
export function href(path, query) {
  const sp = new URLSearchParams();
  const entries = query instanceof URLSearchParams ? query.entries() : Object.entries(query || {});
  for (const [k, v] of entries) {
    if (v == null || v === '' || (Array.isArray(v) && !v.length)) continue;
    sp.set(k, Array.isArray(v) ? v.join(',') : String(v));
  }
  // Commas stay readable in ids lists: runs=1,2,3 rather than runs=1%2C2%2C3.
  const s = sp.toString().replace(/%2C/g, ',');
  return `#/${path}${s ? `?${s}` : ''}`;
}

/** Navigate (adds a history entry and mounts the view). */
export function go(path, query) {
  window.location.hash = href(path, query);
}

/** Rewrite the current view's query without a history entry or a re-mount. */
export function replaceQuery(query) {
  const { name, id } = parseHash();
  const url = href(id == null ? name : `${name}/${id}`, query);
  if (url !== window.location.hash) window.history.replaceState(null, '', url);
}
