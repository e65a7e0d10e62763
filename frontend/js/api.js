// The REST client (docs/api.md). Writes that answer 401 ask for the server's token once,
// keep it in localStorage and retry with `Authorization: Bearer TOKEN`.

const TOKEN_KEY = 'batchlab.token';

/**
 * A non-2xx answer. `detail` is a string, or a 422's list of {loc, msg, type, field, message}
 * where the server already named the field and cleaned the message (core/errors.py).
 */
export class ApiError extends Error {
  constructor(status, detail, path) {
    super(describe(status, detail, path));
    this.status = status;
    this.detail = detail;
  }

  /**
   * Field errors of a 422, placed by `loc`: [{field, index, msg, line}], the field being the
   * input to mark (last string element of `loc`), index the trailing list position if any,
   * line the whole "field: message".
   */
  fieldErrors() {
    if (!Array.isArray(this.detail)) return [];
    return this.detail.map((item) => {
      const loc = Array.isArray(item.loc) ? item.loc : [];
      let index = null;
      let i = loc.length - 1;
      if (i >= 0 && typeof loc[i] === 'number') index = loc[i--];
      const field = i >= 0 ? String(loc[i]) : '';
      return { field, index, msg: item.message, line: errorLine(item) };
    });
  }
}

function describe(status, detail, path) {
  if (typeof detail === 'string' && detail) return detail;
  if (Array.isArray(detail) && detail.length) {
    return detail.map(errorLine).join('; ');
  }
  return `${path}: HTTP ${status}`;
}

function errorLine(item) {
  return item.field ? `${item.field}: ${item.message}` : item.message;
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return ''; // storage disabled: token lives only for this request cycle
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled */
  }
}

/** Ask for the token in the page's <dialog>; resolves to the token or null. */
function askToken(wasWrong) {
  const dialog = document.getElementById('token-dialog');
  if (!dialog) return Promise.resolve(null);
  const input = dialog.querySelector('input[name=token]');
  dialog.querySelector('#token-reason').textContent = wasWrong
    ? 'The saved token was refused. Enter the server token (BATCHLAB_TOKEN).'
    : 'This server needs a token for changes (BATCHLAB_TOKEN).';
  input.value = '';
  return new Promise((resolve) => {
    dialog.addEventListener(
      'close',
      () => resolve(dialog.returnValue === 'ok' && input.value ? input.value.trim() : null),
      { once: true },
    );
    dialog.showModal();
  });
}

/**
 * One request. opts.prompt=false: a 401 throws instead of asking (background previews).
 * Resolves to the parsed JSON (null for 204).
 */
export async function request(method, path, body, opts = {}) {
  const { prompt = true, signal } = opts;
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(path, {
      method,
      headers,
      signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401 && method !== 'GET' && prompt && attempt < 3) {
      const fresh = await askToken(Boolean(token));
      if (!fresh) throw new ApiError(401, 'a token is needed for changes on this server', path);
      setToken(fresh);
      continue;
    }
    if (res.status === 204) return null;
    let data = null;
    const text = await res.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = { detail: text };
      }
    }
    if (!res.ok) throw new ApiError(res.status, data && data.detail, path);
    return data;
  }
}

/** Query string from an object, skipping null/undefined/'' values. */
export function qs(params) {
  const sp = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v == null || v === '') continue;
    sp.set(k, Array.isArray(v) ? v.join(',') : String(v));
  }
  const s = sp.toString();
  return s ? `?${s}` : '';
}

export const api = {
  runs: (filter, opts) => request('GET', `/api/runs${qs(filter)}`, undefined, opts),
  run: (id, opts) => request('GET', `/api/runs/${id}`, undefined, opts),
  createRun: (body) => request('POST', '/api/runs', body),
  cancelRun: (id) => request('POST', `/api/runs/${id}/cancel`, {}),
  deleteRun: (id) => request('DELETE', `/api/runs/${id}`),
  // The run's metric keys, e.g. prefix 'health/' (GET /api/runs/ID/keys).
  runKeys: (id, prefix, opts) => request('GET', `/api/runs/${id}/keys${qs({ prefix })}`, undefined, opts),
  runMetrics: (id, params, opts) =>
    request('GET', `/api/runs/${id}/metrics${qs(params)}`, undefined, opts),
  metrics: (params, opts) => request('GET', `/api/metrics${qs(params)}`, undefined, opts),
  // filter.kind: 'sweep' (default), 'compare' or 'all' (every group).
  sweeps: (filter, opts) => request('GET', `/api/sweeps${qs(filter)}`, undefined, opts),
  sweep: (id, opts) => request('GET', `/api/sweeps/${id}`, undefined, opts),
  createSweep: (body) => request('POST', '/api/sweeps', body),
  schedule: (spec, opts) => request('POST', '/api/schedule', spec, { prompt: false, ...opts }),
  workers: (opts) => request('GET', '/api/workers', undefined, opts),
  health: (opts) => request('GET', '/api/health', undefined, opts),
  streamUrl: (id) => `/api/runs/${id}/stream`,
  // Run management (docs/api.md): rename, tags, notes, archive; bulk actions; extend.
  patchRun: (id, body) => request('PATCH', `/api/runs/${id}`, body),
  bulk: (ids, action, tags) => request('POST', '/api/runs/bulk', { ids, action, ...(tags ? { tags } : {}) }),
  extendRun: (id, epochs) => request('POST', `/api/runs/${id}/extend`, { epochs }),
  runLog: (id, params, opts) => request('GET', `/api/runs/${id}/log${qs(params)}`, undefined, opts),
  // Downloads (plain links): full-resolution points and the runs table.
  runsCsvUrl: (filter) => `/api/runs.csv${qs(filter)}`,
  metricsExportUrl: (ids, format = 'csv') => `/api/metrics.${format}?runs=${ids.join(',')}`,
  runMetricsExportUrl: (id, format = 'csv') => `/api/runs/${id}/metrics.${format}`,
  checkpointUrl: (id) => `/api/runs/${id}/checkpoint`,
};
