// Render the math that pymdownx.arithmatex (generic mode) left in the page, with the vendored
// KaTeX: inline `\( ... \)` in span.arithmatex, display `\[ ... \]` in div.arithmatex.
// Runs on every page load, material's instant navigation included (document$).
function renderMath() {
  for (const el of document.querySelectorAll(".arithmatex")) {
    if (el.dataset.rendered) continue;
    const text = el.textContent.trim();
    const display = text.startsWith("\\[");
    const tex = text.slice(2, -2);
    katex.render(tex, el, { displayMode: display, throwOnError: false });
    el.dataset.rendered = "1";
  }
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
