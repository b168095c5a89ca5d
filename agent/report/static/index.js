// The feature browser of the report's index page: filters, sorts and pages window.AE_FEATURES (data/features.js).
// Every value is written with textContent (labels and names are untrusted text); only one page of rows is in the DOM.
(function () {
  "use strict";
  var data = window.AE_FEATURES;
  var body = document.querySelector("#features tbody");
  var count = document.getElementById("count");
  if (!data || !body) { if (count) { count.textContent = "feature index missing (data/features.js)"; } return; }
  var rows = data.rows, PAGE = 50, page = 0, shown = rows;
  var lower = rows.map(function (r) { return ((r[0] || "") + " " + (r[2] || "")).toLowerCase(); });
  var el = function (id) { return document.getElementById(id); };
  var statuses = {};
  rows.forEach(function (r) { if (r[6]) { statuses[r[6]] = true; } });
  Object.keys(statuses).sort().forEach(function (s) {
    var o = document.createElement("option"); o.value = s; o.textContent = s; el("status").appendChild(o);
  });
  function num(x, d) { return x === null || x === undefined ? "\u2013" : Number(x).toFixed(d); }
  function apply() {
    var q = el("q").value.trim().toLowerCase(), m = Number(el("metric").value);
    var lo = parseFloat(el("min").value), hi = parseFloat(el("max").value);
    if (isNaN(lo)) { lo = 0; } if (isNaN(hi)) { hi = 1; }
    var narrowed = lo > 0 || hi < 1, st = el("status").value, lab = el("labelled").checked;
    var words = q ? q.split(/\s+/) : [];
    shown = [];
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i], v = r[m];
      if (lab && !r[2]) { continue; }
      if (st && r[6] !== st) { continue; }
      if (narrowed && (v === null || v < lo || v > hi)) { continue; }
      var ok = true;
      for (var w = 0; w < words.length; w++) { if (lower[i].indexOf(words[w]) < 0) { ok = false; break; } }
      if (ok) { shown.push(r); }
    }
    var sort = el("sort").value;
    if (sort === "score") {
      shown.sort(function (a, b) { return (b[m] === null ? -1 : b[m]) - (a[m] === null ? -1 : a[m]); });
    } else if (sort === "density") {
      shown.sort(function (a, b) { return (b[7] || 0) - (a[7] || 0); });
    }
    page = 0; render();
  }
  function render() {
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    if (page >= pages) { page = pages - 1; }
    var frag = document.createDocumentFragment();
    shown.slice(page * PAGE, (page + 1) * PAGE).forEach(function (r) {
      var tr = document.createElement("tr");
      var a = document.createElement("a"); a.href = r[1]; a.textContent = r[0];
      var td = document.createElement("td"); td.appendChild(a); tr.appendChild(td);
      [r[2] || "\u2013", num(r[3], 2), num(r[4], 2), num(r[5], 2), r[6] || "\u2013", num(r[7], 5)].forEach(
        function (text, j) {
          var c = document.createElement("td"); c.textContent = text; if (j === 0) { c.className = "label"; }
          tr.appendChild(c);
        });
      frag.appendChild(tr);
    });
    body.textContent = "";
    body.appendChild(frag);
    count.textContent = shown.length + " of " + rows.length + " features";
    el("pageinfo").textContent = "page " + (page + 1) + " of " + pages;
    el("prev").disabled = page === 0;
    el("next").disabled = page >= pages - 1;
  }
  var timer = null;
  function later() { clearTimeout(timer); timer = setTimeout(apply, 120); }
  ["q", "min", "max"].forEach(function (id) { el(id).addEventListener("input", later); });
  ["metric", "status", "labelled", "sort"].forEach(function (id) { el(id).addEventListener("change", apply); });
  el("filters").addEventListener("submit", function (e) { e.preventDefault(); apply(); });
  el("prev").addEventListener("click", function () { page -= 1; render(); });
  el("next").addEventListener("click", function () { page += 1; render(); });
  apply();
})();
