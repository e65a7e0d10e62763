// Safe DOM building. User text (run names, errors, specs) only ever reaches the page as
// text nodes or attribute values: nothing here assigns innerHTML.

/**
 * Create an element: h('a', {href: '#/runs', class: 'x'}, 'text', childNode, [more]).
 * Props: class, style (object), dataset (object), on<event> (listener), DOM properties
 * for non-string values (checked, disabled, value), attributes otherwise.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'style' && typeof value === 'object') Object.assign(el.style, value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

/** Append children (nodes, strings, numbers, nested arrays; null/false skipped) as nodes. */
export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace all children of el. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** Set an element's text only when it changed (keeps live tables cheap and flicker-free). */
export function setText(el, text) {
  const s = text == null ? '' : String(text);
  if (el.textContent !== s) el.textContent = s;
}

/**
 * Escape text for Plotly labels (trace names, titles, hover text). Plotly renders a
 * subset of HTML in those strings (<b>, <br>, <a href>), so a run named "<b>x" must be
 * entity-encoded to show literally.
 */
export function escapeHtml(text) {
  return String(text ?? '').replace(/[&<>"']/g, (c) => ENTITIES[c]);
}

// Numeric entities for quotes: Plotly decodes &amp; &lt; &gt; and &#NN; but not &quot;.
const ENTITIES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;' };
