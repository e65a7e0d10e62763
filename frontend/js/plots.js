// Plotly, loaded once on demand, and the look shared by every chart.
//
// Two builds of one Plotly.js version: the full plotly.min.js of the plotly Python package
// (4.8 MB: heatmaps, parcoords, ...) and plotly-basic.min.js (1.2 MB: scatter, bar and
// pie on cartesian axes, vendored in frontend/vendor/, see its README). Line charts ask
// for 'basic', which compiles and starts about 3x sooner: on a cold page load that was
// the larger half of the compare view's first paint (docs/benchmarks.md, issue 12).

const BUNDLES = {
  basic: '/static/vendor/plotly-basic.min.js',
  full: '/static/vendor/plotly.min.js',
};
const instances = { basic: null, full: null };
const pending = {};

/**
 * Resolve to a Plotly that can draw `build`'s traces: 'full' (the default: any trace
 * type) or 'basic' (scatter, bar, pie), inserting its <script> the first time. A basic
 * request takes the full build when that is already there, and falls back to it when
 * the basic file is missing. window.Plotly is the full build once it has loaded.
 */
export function loadPlotly(build = 'full') {
  if (window.Plotly && !instances.basic && !instances.full) instances.full = ownCharts(window.Plotly);
  const ready = build === 'basic' ? instances.full || instances.basic : instances.full;
  if (ready) return Promise.resolve(ready);
  if (!pending[build]) {
    pending[build] = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = BUNDLES[build];
      script.async = true;
      script.onload = () => {
        instances[build] = ownCharts(window.Plotly);
        if (instances.full) window.Plotly = instances.full;
        resolve(instances[build]);
      };
      script.onerror = () => {
        delete pending[build];
        if (build === 'basic') loadPlotly('full').then(resolve, reject);
        else reject(new Error(`could not load ${BUNDLES[build]}`));
      };
      document.head.append(script);
    });
  }
  return pending[build];
}

/**
 * A chart must be restyled and purged by the build that drew it (the two builds' d3
 * objects do not mix): newPlot and react remember it on the chart's element.
 */
function ownCharts(Plotly) {
  for (const name of ['newPlot', 'react']) {
    const draw = Plotly[name];
    Plotly[name] = function (gd, ...rest) {
      const el = typeof gd === 'string' ? document.getElementById(gd) : gd;
      if (el) el.__plotly = Plotly;
      return draw.call(this, gd, ...rest);
    };
  }
  return Plotly;
}

/** The Plotly build that drew chart element `el` (the loaded one if none did). */
function ownerOf(el) {
  return el.__plotly || window.Plotly;
}

// The compare figure's specification (palette, trace templates, layout), which the
// notebook's batchlab/figure.py reads too; the other charts share its palette and look.
export const FIGURE = await (await fetch(new URL('../figure_spec.json', import.meta.url))).json();
export const PALETTE = FIGURE.palette;

// Dark mode follows the system setting (prefers-color-scheme, as app.css does).
// figure_spec.json's light look is the spec the notebook shares; dark overrides only the
// background, grid and text, and the baseline's black, which would vanish on dark paper.
const DARK_QUERY = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;
export const DARK = {
  paper: '#161b22',
  text: '#d4d9e1',
  grid: '#2a303a',
  line: '#566072',
  legend: 'rgba(22,27,34,0.85)',
  baseline: '#e6e6e6',
};

export function isDark() {
  return Boolean(DARK_QUERY && DARK_QUERY.matches);
}

// A live binding: views that import it read the colour of the current scheme.
export let BASELINE_COLOR = isDark() ? DARK.baseline : FIGURE.baseline.color;

/** A layout in the current scheme: dark paper, grid and text when the system is dark. */
export function themed(layout) {
  if (!isDark()) return layout;
  const out = {
    ...layout,
    paper_bgcolor: DARK.paper,
    plot_bgcolor: DARK.paper,
    font: { ...(layout.font || {}), color: DARK.text },
  };
  for (const key of Object.keys(out)) {
    if (/^[xy]axis\d*$/.test(key)) {
      out[key] = { ...out[key], gridcolor: DARK.grid, zerolinecolor: DARK.line, linecolor: DARK.line, tickcolor: DARK.line };
    }
  }
  if (out.legend && out.legend.bgcolor !== 'rgba(0,0,0,0)') {
    out.legend = { ...out.legend, bgcolor: DARK.legend, bordercolor: DARK.grid };
  }
  return out;
}

// The system switched scheme: re-colour the charts on the page now (the next draw of
// each view picks the new baseline colour up).
DARK_QUERY?.addEventListener?.('change', () => {
  BASELINE_COLOR = isDark() ? DARK.baseline : FIGURE.baseline.color;
  if (!window.Plotly) return;
  for (const el of document.querySelectorAll('.js-plotly-plot')) {
    const light = { paper_bgcolor: FIGURE.layout.paper_bgcolor, plot_bgcolor: FIGURE.layout.plot_bgcolor, font: { ...FIGURE.layout.font } };
    const axes = Object.keys(el.layout || {}).filter((k) => /^[xy]axis\d*$/.test(k));
    const base = { ...light, ...Object.fromEntries(axes.map((k) => [k, { ...FIGURE.axis }])) };
    const next = themed({ ...base, legend: el.layout.legend });
    const update = { paper_bgcolor: next.paper_bgcolor, plot_bgcolor: next.plot_bgcolor, 'font.color': next.font.color };
    for (const k of axes) {
      for (const prop of ['gridcolor', 'zerolinecolor', 'linecolor', 'tickcolor']) update[`${k}.${prop}`] = next[k][prop];
    }
    ownerOf(el).relayout(el, update);
  }
});

export function colorAt(i) {
  return PALETTE[i % PALETTE.length];
}

/** rgba() of a #rrggbb colour with alpha (bands, faint raw curves). */
export function withAlpha(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${alpha})`;
}

/** Base layout: tight margins, light grid, no title bar (titles live in the page). */
export function baseLayout(extra = {}) {
  return themed({
    font: FIGURE.layout.font,
    margin: { l: 56, r: 16, t: 24, b: 40 },
    paper_bgcolor: '#fff',
    plot_bgcolor: '#fff',
    hovermode: 'x unified',
    hoverlabel: { namelength: -1 },
    showlegend: true,
    legend: { orientation: 'h', y: 1.02, yanchor: 'bottom', x: 0, bgcolor: 'rgba(0,0,0,0)' },
    xaxis: axis(),
    yaxis: axis(),
    ...extra,
  });
}

export function axis(extra = {}) {
  return { ...FIGURE.axis, ...extra };
}

export const PLOT_CONFIG = {
  displaylogo: false,
  responsive: true,
  scrollZoom: false,
  modeBarButtonsToRemove: ['select2d', 'lasso2d', 'autoScale2d', 'toggleSpikelines'],
};

/** Tell listeners (tests, bench/browser_perf.py) that a view finished drawing. */
export function announceDrawn(detail) {
  document.dispatchEvent(new CustomEvent('batchlab:drawn', { detail }));
}

/** Tick labels of a log2 batch-size axis: 32, 64, ..., 1k, 2k, ... */
export function log2Ticks(values) {
  const finite = values.filter((v) => v > 0);
  if (finite.length === 0) return { tickvals: [], ticktext: [] };
  const lo = Math.floor(Math.log2(Math.min(...finite)));
  const hi = Math.ceil(Math.log2(Math.max(...finite)));
  const tickvals = [];
  for (let e = lo; e <= hi; e++) tickvals.push(2 ** e);
  const ticktext = tickvals.map((v) => (v >= 1024 ? `${v / 1024}k` : String(v)));
  return { tickvals, ticktext };
}

/** Remove a plot and its listeners (views call this on unmount). */
export function purge(el) {
  if (window.Plotly && el) ownerOf(el).purge(el);
}
