// Plotly, loaded once on demand from the plotly Python package (/static/vendor), and the
// look shared by every chart.

let plotlyPromise = null;

/** Resolve to window.Plotly, inserting its <script> the first time. */
export function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyPromise) {
    plotlyPromise = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = '/static/vendor/plotly.min.js';
      script.async = true;
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => {
        plotlyPromise = null;
        reject(new Error('could not load /static/vendor/plotly.min.js'));
      };
      document.head.append(script);
    });
  }
  return plotlyPromise;
}

export const BASELINE_COLOR = '#111111';

// Tableau 10 without its grey: distinct, print-friendly, none close to black.
export const PALETTE = [
  '#4e79a7', '#e15759', '#f28e2b', '#59a14f', '#b07aa1',
  '#76b7b2', '#edc948', '#ff9da7', '#9c755f', '#2f4b7c',
  '#d62728', '#17becf',
];

export function colorAt(i) {
  return PALETTE[i % PALETTE.length];
}

/** rgba() of a #rrggbb colour with alpha (bands, faint raw curves). */
export function withAlpha(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${alpha})`;
}

const FONT = {
  family: 'system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif',
  size: 12,
  color: '#222',
};

/** Base layout: tight margins, light grid, no title bar (titles live in the page). */
export function baseLayout(extra = {}) {
  return {
    font: FONT,
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
  };
}

export function axis(extra = {}) {
  return {
    gridcolor: '#eceef1',
    zerolinecolor: '#d0d4da',
    linecolor: '#aab',
    showline: true,
    ticks: 'outside',
    tickcolor: '#aab',
    automargin: true,
    ...extra,
  };
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
  if (window.Plotly && el) window.Plotly.purge(el);
}
