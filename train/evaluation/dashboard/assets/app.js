// The dashboard's page logic: an index of every feature (sort, search, pages) and a panel per
// feature, loaded on demand from data/features_NNNN.js. Token text is only ever set through
// textContent, so nothing in the data can inject markup.
(function () {
  "use strict";
  var DASH = (window.DASH = window.DASH || {});
  var PAGE_SIZE = 100;
  var COLUMNS = ["feature", "log_density", "max", "mean", "top_tokens", "promoted"];
  var state = { sortKey: "feature", sortDir: 1, page: 0, query: "", hideDead: true };
  var chunks = {}; // chunk number -> {feature: record}
  var waiting = {}; // chunk number -> callbacks

  DASH.addFeatures = function (chunk, records) {
    chunks[chunk] = records;
    (waiting[chunk] || []).forEach(function (cb) { cb(records); });
    delete waiting[chunk];
  };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { node.appendChild(c); });
    return node;
  }

  function tokenText(id) {
    var s = DASH.vocab && Object.prototype.hasOwnProperty.call(DASH.vocab, id) ? DASH.vocab[id] : "#" + id;
    return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "";
    return Number(x).toPrecision(digits || 3);
  }

  function percent(share) {
    // Exact shares: "0%" only when none, "<0.1%" for a few rows, so that no non-empty range reads as empty.
    if (share === 0) return "0%";
    if (share < 0.001) return "<0.1%";
    return (100 * share).toFixed(share < 0.1 ? 1 : 0) + "%";
  }

  // ------------------------------------------------------------------ index

  function indexRows() {
    return DASH.index.rows.map(function (r) {
      var row = {};
      COLUMNS.forEach(function (c, i) { row[c] = r[i]; });
      row.text = (row.top_tokens.concat(row.promoted)).map(tokenText).join(" ").toLowerCase();
      return row;
    });
  }

  function matches(row) {
    if (state.hideDead && row.log_density === null) return false;
    var q = state.query.trim().toLowerCase();
    if (!q) return true;
    if (/^\d+$/.test(q)) return String(row.feature) === q || row.text.indexOf(q) >= 0;
    return row.text.indexOf(q) >= 0;
  }

  function compare(a, b) {
    var x = a[state.sortKey], y = b[state.sortKey];
    if (x === null) return 1; // dead features last, whatever the direction
    if (y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : a.feature - b.feature) * state.sortDir;
  }

  function chips(ids, negative) {
    return el("span", { className: negative ? "chips neg" : "chips" },
      ids.map(function (id) { return el("span", { className: "tok", text: tokenText(id) }); }));
  }

  function renderIndex(all) {
    var rows = all.filter(matches).sort(compare);
    var pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    var body = document.querySelector("#index tbody");
    body.textContent = "";
    rows.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).forEach(function (r) {
      var link = el("a", { href: "#f=" + r.feature, text: String(r.feature) });
      body.appendChild(el("tr", { "data-feature": String(r.feature) }, [
        el("td", {}, [link]),
        el("td", { text: r.log_density === null ? "never fires" : fmt(r.log_density) }),
        el("td", { text: fmt(r.max) }),
        el("td", { text: fmt(r.mean) }),
        el("td", {}, [chips(r.top_tokens)]),
        el("td", {}, [chips(r.promoted)]),
      ]));
    });
    document.getElementById("count").textContent = rows.length + " of " + all.length + " features";
    document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages;
    document.querySelectorAll("#index th").forEach(function (th) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.dataset.key === state.sortKey) th.classList.add(state.sortDir > 0 ? "sorted-asc" : "sorted-desc");
    });
  }

  // ------------------------------------------------------------------ one feature

  function loadFeature(f, cb) {
    // A feature outside the SAE has no data file: say so instead of requesting one that is not there.
    if (!(f >= 0 && f < DASH.meta.n_features)) return cb({ missing: f });
    var chunk = Math.floor(f / DASH.meta.chunk_size);
    if (chunks[chunk]) return cb(chunks[chunk][f]);
    var first = !waiting[chunk];
    (waiting[chunk] = waiting[chunk] || []).push(function (records) { cb(records[f]); });
    if (first) {
      var name = "data/features_" + String(chunk).padStart(4, "0") + ".js";
      document.head.appendChild(el("script", { src: name }));
    }
  }

  function example(ex, featureMax, label) {
    // ex: [activation, dump row, window token ids (-1 outside the context), window activations]
    var centre = DASH.meta.window_before;
    var line = el("div", { className: "example" }, [el("span", { className: "val", text: label || fmt(ex[0]) })]);
    ex[2].forEach(function (id, i) {
      if (id < 0) return;
      var act = ex[3][i];
      var alpha = featureMax > 0 ? Math.min(1, act / featureMax) : 0;
      var tok = el("span", { className: i === centre ? "tok max" : "tok", text: tokenText(id),
        title: "activation " + fmt(act, 4) + (i === centre ? " (this example's token)" : "") });
      tok.style.background = "rgba(255, 120, 0, " + alpha.toFixed(3) + ")";
      tok.dataset.act = String(act);
      line.appendChild(tok);
    });
    line.title = "dump row " + ex[1];
    return line;
  }

  function barChart(counts, o) {
    // Bars of counts per bin, with a y axis (0, half and the peak) and each bar's count on hover.
    // o: className, lo and hi (the x axis's ends, as text), xName, yName, binText(i, count).
    var left = 48, width = 460, height = 110, bins = counts.length;
    var peak = Math.max.apply(null, counts.concat([1]));
    var svgNS = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("width", left + width);
    svg.setAttribute("height", height + 44);
    svg.setAttribute("class", o.className);
    var root = svg;  // everything 10 px down: the peak's tick label is not cut at the top
    svg = document.createElementNS(svgNS, "g");
    svg.setAttribute("transform", "translate(0, 10)");
    root.appendChild(svg);
    function text(x, y, anchor, content) {
      var t = document.createElementNS(svgNS, "text");
      t.setAttribute("x", x);
      t.setAttribute("y", y);
      t.setAttribute("text-anchor", anchor);
      t.setAttribute("font-size", "11");
      t.textContent = content;
      svg.appendChild(t);
      return t;
    }
    var axis = document.createElementNS(svgNS, "line");
    axis.setAttribute("x1", left - 2); axis.setAttribute("x2", left - 2);
    axis.setAttribute("y1", 0); axis.setAttribute("y2", height);
    axis.setAttribute("stroke", "#888");
    svg.appendChild(axis);
    [0, Math.round(peak / 2), peak].forEach(function (v) {
      var tick = text(left - 6, height - (v / peak) * height + 4, "end", String(v));
      tick.setAttribute("class", "y-tick");
    });
    text(0, height + 30, "start", o.yName);
    counts.forEach(function (c, i) {
      var h = (c / peak) * height;
      var bar = document.createElementNS(svgNS, "rect");
      bar.setAttribute("class", "bar");
      bar.setAttribute("x", left + (i * width) / bins);
      bar.setAttribute("y", height - h);
      bar.setAttribute("width", Math.max(1, width / bins - 1));
      bar.setAttribute("height", h);
      var title = document.createElementNS(svgNS, "title");
      title.textContent = o.binText(i, c);
      bar.appendChild(title);
      svg.appendChild(bar);
    });
    text(left, height + 15, "start", o.lo);
    text(left + width, height + 15, "end", o.hi);
    text(left + width / 2, height + 30, "middle", o.xName);
    return root;
  }

  function histogram(hist, featureMax) {
    // A feature's activations: rows per bin of width hist.width from 0.
    return barChart(hist.counts, {
      className: "histogram", lo: "0", hi: fmt(hist.width * hist.counts.length), xName: "activation", yName: "rows",
      binText: function (i, c) { return c + " rows in [" + fmt(i * hist.width) + ", " + fmt((i + 1) * hist.width) + ")"; }
    });
  }

  var DENSITY_LO = -10, DENSITY_HI = 0, DENSITY_BINS = 20;  // log10 density, as eval.json's histogram

  function densityHistogram(all) {
    // The index's view of the dictionary: how many features fire how often (log10 of the fraction
    // of rows each fires on; below 1e-10 in the first bin), the ones that never fire counted apart.
    var counts = [], never = 0, i;
    for (i = 0; i < DENSITY_BINS; i++) counts.push(0);
    var step = (DENSITY_HI - DENSITY_LO) / DENSITY_BINS;
    all.forEach(function (r) {
      if (r.log_density === null) { never += 1; return; }
      var b = Math.floor((r.log_density - DENSITY_LO) / step);
      counts[Math.min(DENSITY_BINS - 1, Math.max(0, b))] += 1;
    });
    var chart = barChart(counts, {
      className: "density-histogram", lo: String(DENSITY_LO), hi: String(DENSITY_HI),
      xName: "log10 density (fraction of rows a feature fires on)", yName: "features",
      binText: function (b, c) {
        return c + " features with log10 density in [" + fmt(DENSITY_LO + b * step) + ", " + fmt(DENSITY_LO + (b + 1) * step) + ")";
      }
    });
    return el("div", { id: "density" }, [
      el("p", { className: "note", id: "density-note",
                text: "Feature density: " + (all.length - never) + " features fire" +
                      (never ? ", " + never + " never fire (not shown)" : "") + "." }),
      chart]);
  }

  function featureLink(f, text) {
    return el("a", { href: "#f=" + f, text: text || "feature " + f });
  }

  function absorptionSection(letters) {
    // eval.json's per-letter absorption (evaluate --absorption): each letter's main feature and the
    // features that took the tokens it missed. Absent when absorption was not measured.
    var body = el("tbody");
    letters.forEach(function (r) {
      var absorbers = r.absorbing_features === null ? [el("span", { className: "note",
        text: "not recorded (rerun evaluate --absorption)" })] : r.absorbing_features.length === 0 ?
        [el("span", { className: "note", text: "none" })] : [];
      (r.absorbing_features || []).forEach(function (a, i) {
        if (i) absorbers.push(document.createTextNode(", "));
        absorbers.push(featureLink(a.feature));
        absorbers.push(document.createTextNode(" (" + a.n_absorbed + ")"));
      });
      body.appendChild(el("tr", { "data-letter": r.letter }, [
        el("td", { text: r.letter }),
        el("td", {}, [featureLink(r.main_feature)]),
        el("td", { text: fmt(r.f1) }),
        el("td", { text: fmt(r.rate) }),
        el("td", { text: r.n_absorbed + " of " + r.n_true_positives }),
        el("td", { className: "absorbers" }, absorbers),
      ]));
    });
    var head = el("thead", {}, [el("tr", {}, ["letter", "main feature", "F1", "rate", "absorbed tokens",
      "absorbing features (tokens)"].map(function (h) { return el("th", { text: h }); }))]);
    return el("div", { id: "absorption" }, [
      el("h2", { text: "Feature absorption (first letter)" }),
      el("table", { id: "absorption-table" }, [head, body]),
      el("p", { className: "note", text: "From eval.json (evaluate --absorption), on the test word tokens: a letter's " +
        "main feature is the one whose firing best gives the letter; rate: the share of the letter's probe true " +
        "positives that the main feature misses and one other feature takes; the absorbing features are those, " +
        "with how many tokens each took (at most 10 listed)." })]);
  }

  function absorptionRoles(roles) {
    // A feature page's part in the letters' absorption: main feature for some letters, absorber of others.
    return el("div", { id: "feature-absorption" }, [el("h3", { text: "Feature absorption (first letter)" })].concat(
      roles.map(function (r) {
        return el("div", { text: r.role === "main" ? "main feature for letter '" + r.letter + "' (F1 " + fmt(r.f1) +
          ", absorption rate " + fmt(r.rate) + ")" : "absorbs '" + r.letter + "' on " + r.n_absorbed +
          (r.n_absorbed === 1 ? " token" : " tokens") });
      })));
  }

  function logitList(pairs, negative) {
    return el("div", {}, pairs.map(function (p) {
      return el("div", {}, [el("span", { className: negative ? "chips neg" : "chips" },
        [el("span", { className: "tok", text: tokenText(p[0]) })]), el("span", { text: " " + fmt(p[1]) })]);
    }));
  }

  function renderFeature(rec) {
    var box = document.getElementById("feature");
    box.textContent = "";
    if (!rec) { box.appendChild(el("p", { text: "No such feature." })); return; }
    if (rec.missing !== undefined) {
      box.appendChild(el("p", { id: "unknown-feature", text: "There is no feature " + rec.missing + ": this SAE has features 0 to " +
        (DASH.meta.n_features - 1) + ". Pick one from the index." }));
      return;
    }
    box.appendChild(el("h2", { text: "Feature " + rec.feature }));
    box.appendChild(el("p", { text: rec.fired === 0 ? "Never fires on the dump's " + DASH.meta.n_rows + " rows." :
      "Fires on " + rec.fired + " of " + DASH.meta.n_rows + " rows (density " + fmt(rec.density) +
      ", log10 " + fmt(Math.log10(rec.density)) + "); max activation " + fmt(rec.max) +
      ", mean when firing " + fmt(rec.mean) + "." }));
    if (rec.absorption) box.appendChild(absorptionRoles(rec.absorption));
    if (rec.fired > 0) {
      box.appendChild(el("h3", { text: "Top activations" }));
      var top = el("div", { id: "top-examples" });
      rec.top.forEach(function (ex) { top.appendChild(example(ex, rec.max)); });
      box.appendChild(top);
      box.appendChild(el("p", { className: "note", text: "Each token is shaded by this feature's activation on it; " +
        "the outlined token is the example's own (hover a token for its value)." }));
      box.appendChild(el("h3", { text: "Samples from each activation range" }));
      var ranges = el("div", { id: "range-examples" });
      rec.ranges.forEach(function (r) {
        ranges.appendChild(el("h4", { text: "[" + fmt(r.lo) + ", " + fmt(r.hi) + "): " +
          percent(r.share) + " of the rows it fires on" }));
        if (!r.examples.length) ranges.appendChild(el("p", { className: "note", text: r.share > 0 ?
          "none among the uniformly sampled rows (too rare here to be drawn)" : "no rows in this range" }));
        r.examples.forEach(function (ex) { ranges.appendChild(example(ex, rec.max)); });
      });
      box.appendChild(ranges);
      box.appendChild(el("p", { className: "note", text: "Each range's share is exact (from the histogram below); " +
        "its examples are drawn uniformly from the rows where the feature fires." }));
      box.appendChild(el("h3", { text: "Activation histogram (non-zero activations)" }));
      box.appendChild(histogram(rec.hist, rec.max));
    }
    var cols = el("div", { className: "cols" });
    if (rec.promoted) {
      cols.appendChild(el("div", {}, [el("h3", { text: "Promoted tokens" }), logitList(rec.promoted, false)]));
      cols.appendChild(el("div", {}, [el("h3", { text: "Suppressed tokens" }), logitList(rec.suppressed, true)]));
    }
    var nb = el("div", { id: "neighbours" }, [el("h3", { text: "Nearest features (decoder cosine)" })]);
    rec.neighbours.forEach(function (n) {
      nb.appendChild(el("div", {}, [featureLink(n[0]), el("span", { text: "  " + fmt(n[1]) })]));
    });
    cols.appendChild(nb);
    box.appendChild(cols);
    if (rec.promoted) box.appendChild(el("p", { className: "note", text: "Promoted and suppressed tokens: the " +
      "decoder direction times the unembedding (final norm's weight folded in), the direct path to the logits only; " +
      "later layers can change the feature's real effect." }));
  }

  // ------------------------------------------------------------------ routing and setup

  function route(all) {
    var m = /^#f=(\d+)$/.exec(window.location.hash);
    document.getElementById("index-view").hidden = !!m;
    document.getElementById("feature-view").hidden = !m;
    if (m) loadFeature(Number(m[1]), renderFeature);
    else renderIndex(all);
  }

  function header() {
    var meta = DASH.meta;
    document.getElementById("title").textContent = meta.title;
    document.title = meta.title;
    document.getElementById("subtitle").textContent = meta.subtitle;
    var table = document.getElementById("sae-metrics");
    Object.keys(meta.metrics || {}).forEach(function (k) {
      table.appendChild(el("tr", {}, [el("td", { text: k }), el("td", { text: fmt(meta.metrics[k], 4) })]));
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var all = indexRows();
    header();
    var view = document.getElementById("index-view");
    view.insertBefore(densityHistogram(all), view.querySelector(".controls"));
    if (DASH.meta.absorption) {  // absorption measured (eval.json): its table below the density histogram
      view.insertBefore(absorptionSection(DASH.meta.absorption), view.querySelector(".controls"));
    }
    document.getElementById("search").addEventListener("input", function (e) {
      state.query = e.target.value; state.page = 0; renderIndex(all);
    });
    document.getElementById("hide-dead").addEventListener("change", function (e) {
      state.hideDead = e.target.checked; state.page = 0; renderIndex(all);
    });
    document.querySelectorAll("#index th").forEach(function (th) {
      if (th.classList.contains("nosort")) return;
      th.addEventListener("click", function () {
        var key = th.dataset.key;
        state.sortDir = state.sortKey === key ? -state.sortDir : key === "feature" ? 1 : -1;
        state.sortKey = key; state.page = 0; renderIndex(all);
      });
    });
    document.getElementById("prev").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); renderIndex(all); });
    document.getElementById("next").addEventListener("click", function () { state.page += 1; renderIndex(all); });
    document.getElementById("back").addEventListener("click", function (e) { e.preventDefault(); window.location.hash = ""; });
    window.addEventListener("hashchange", function () { route(all); });
    route(all);
  });
})();
