// scvnet-search: the page's only script (no libraries). Upload or drop an image, draw a
// box on it, search; the proposed regions are drawn on the query; the hits are thumbnails:
// click one to see it full size (with its original file), "search with this" to search
// with it.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  let query = null;      // {file: File} or {id: number, version: the index's it is of}
  let image = null;      // the query as an HTMLImageElement
  let box = null;        // [x1, y1, x2, y2] in image pixels
  let regions = [];      // proposed regions of the last search
  let drag = null;
  let scoreKind = "";    // what the last search's scores are
  let viewing = null;    // the hit open in the viewer

  function status(text, error) {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  }

  function draw() {
    if (!image) return;
    ctx.drawImage(image, 0, 0);
    ctx.lineWidth = Math.max(2, image.naturalWidth / 200);
    ctx.strokeStyle = "#ffb000";
    for (const r of regions) ctx.strokeRect(r[0], r[1], r[2] - r[0], r[3] - r[1]);
    canvas.dataset.box = box ? box.join(",") : "";
    canvas.dataset.regions = JSON.stringify(regions);
    if (box) {
      ctx.strokeStyle = "#00c853";
      ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    }
  }

  function show(src, q) {
    const im = new Image();
    im.onload = () => {
      image = im; query = q; box = null; regions = [];
      canvas.width = im.naturalWidth; canvas.height = im.naturalHeight;
      $("stage").hidden = false; $("search").disabled = false;
      draw();
      search();
    };
    im.onerror = () => {   // (a TIFF, or no image at all): the server says which
      image = null; query = q; box = null; regions = [];
      $("stage").hidden = true; $("search").disabled = false;
      search("the browser cannot show this file; ");
    };
    im.src = src;
  }

  function useFile(file) {
    if (!file) return;
    show(URL.createObjectURL(file), {file: file});
  }

  function toImage(ev) {
    const r = canvas.getBoundingClientRect();
    return [Math.round((ev.clientX - r.left) * canvas.width / r.width),
            Math.round((ev.clientY - r.top) * canvas.height / r.height)];
  }

  canvas.addEventListener("mousedown", (ev) => { drag = toImage(ev); });
  canvas.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const p = toImage(ev);
    box = [Math.min(drag[0], p[0]), Math.min(drag[1], p[1]),
           Math.max(drag[0], p[0]), Math.max(drag[1], p[1])];
    draw();
  });
  window.addEventListener("mouseup", () => {
    if (!drag) return;
    drag = null;
    if (box && (box[2] - box[0] < 8 || box[3] - box[1] < 8)) box = null;
    draw();
    if (box) search();
  });
  $("clearbox").addEventListener("click", () => { box = null; draw(); search(); });
  $("file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    useFile(ev.dataTransfer.files[0]);
  });
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("rerank").addEventListener("change", () => {
    $("rerank_k").disabled = $("rerank").value === "none";
  });
  $("rerank_k").disabled = $("rerank").value === "none";

  // the number fields, checked here: the browser's own min/max check would block the
  // form without a word
  function number(id, lo, hi) {
    const text = $(id).value.trim();
    const v = Number(text);
    if (text === "" || !Number.isInteger(v) || v < lo || v > hi) {
      throw new Error(`${id.replace("_", " ")} must be a whole number from ${lo} to ${hi}` +
                      ` (got ${text === "" ? "nothing" : JSON.stringify(text)})`);
    }
    return String(v);
  }

  function clear(text) {      // no stale hits next to an error
    grid([]);
    scoreKind = "";
    $("scorekind").textContent = "";
    status(text, true);
  }

  async function search(note) {
    if (!query) return;
    const rerank = $("rerank").value;
    const params = new URLSearchParams({rerank: rerank});
    try {
      params.set("k", number("k", 1, 1000));
      params.set("regions", number("regions", 0, 20));
      if (rerank !== "none") params.set("rerank_k", number("rerank_k", 1, 1000));
    } catch (e) {
      clear("not searched: " + e.message);
      return;
    }
    if (box) params.set("box", box.join(","));
    const body = new FormData();
    if (query.file) body.append("image", query.file);
    else params.set("id", query.id);
    if (query.version) params.set("v", query.version);
    status((note || "") + "searching ...");
    $("search").disabled = true;
    try {
      const res = await fetch("/api/search?" + params, {method: "POST", body: body});
      let out;
      try { out = await res.json(); } catch (e) { out = {}; }
      if (res.status === 401) askToken();
      if (!res.ok) { clear((note || "") + (out.error || res.statusText)); return; }
      regions = out.regions || [];
      draw();
      scoreKind = out.score_kind || "";
      $("scorekind").textContent = scoreKind ? "Scores: " + scoreKind : "";
      // ids are of the index version the server answered with (the folder may be
      // re-indexed meanwhile): the query's own id follows it, if it is still indexed
      if (!query.file) {
        query = out.query_id !== undefined ? {id: out.query_id, version: out.version} :
          {id: query.id, version: query.version, gone: true};
      }
      // each hit remembers its query (for "why it matched": the query may change later)
      const asked = {query: query, box: box ? box.slice() : null, queryImage: image,
                     version: out.version};
      for (const h of out.hits) {
        Object.assign(h, asked, {explainable: image !== null && !query.gone});
      }
      grid(out.hits);
      status((note || "") + `${out.hits.length} hits in ${out.timings.search_ms} ms ` +
             `(${out.timings.total_ms} ms in all)` +
             (regions.length ? `; ${regions.length} regions searched too` : "") +
             ((out.missing || []).length ? `; ${out.missing.length} indexed file(s) no ` +
              `longer exist and were left out (re-index the collection)` : ""));
    } catch (e) {
      clear("the server did not answer: " + e);
    } finally {
      $("search").disabled = false;
    }
  }

  // the shortest path tails that tell the hits apart: "name", or "folder/name" when two
  // hits share a file name (and so on up)
  function labels(paths) {
    const parts = paths.map((p) => p.split(/[\\/]/).filter((s) => s !== ""));
    const depth = parts.map(() => 1);
    for (;;) {
      const names = parts.map((ps, i) => ps.slice(-depth[i]).join("/"));
      const count = new Map();
      for (const n of names) count.set(n, (count.get(n) || 0) + 1);
      let longer = false;
      names.forEach((n, i) => {
        if (count.get(n) > 1 && depth[i] < parts[i].length) { depth[i] += 1; longer = true; }
      });
      if (!longer) return names;
    }
  }

  // an indexed image's URL parameter: the index version its id is of
  function at(h) {
    return h.version ? "?v=" + encodeURIComponent(h.version) : "";
  }

  function useHit(h) {
    closeViewer();
    show("/api/image/" + h.id + at(h), {id: h.id, version: h.version});
  }

  // one thumbnail tile: the image, its score and its name; a click opens the viewer
  function tile(h, name, title) {
    const div = document.createElement("div");
    div.className = "hit";
    div.dataset.id = h.id;
    div.dataset.path = h.path;
    div.title = title;
    const img = document.createElement("img");
    img.src = "/api/thumb/" + h.id + at(h);
    img.alt = h.path;
    img.loading = "lazy";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = h.score.toFixed(4);
    const label = document.createElement("div");
    label.className = "name";
    label.textContent = name;
    div.append(img, score, label);
    div.addEventListener("click", () => openViewer(h));
    return div;
  }

  function grid(hits) {
    const g = $("grid");
    g.replaceChildren();
    const names = labels(hits.map((h) => h.path));
    hits.forEach((h, i) => {
      const div = tile(h, names[i], `${h.path}\nscore ${h.score.toFixed(4)}: ${scoreKind}\n` +
                                    "click: view it; the button: search with it");
      const use = document.createElement("button");
      use.type = "button";
      use.className = "use";
      use.textContent = "search with this";
      use.addEventListener("click", (ev) => { ev.stopPropagation(); useHit(h); });
      div.append(use);
      g.append(div);
    });
  }

  function openViewer(h) {
    viewing = h;
    $("viewer-image").src = "/api/image/" + h.id + at(h);
    $("viewer-image").alt = h.path;
    $("viewer-image").hidden = false;
    $("viewer-match").hidden = true;
    $("viewer-toggle").hidden = true;
    $("viewer-path").textContent = h.path;
    $("viewer-score").textContent = `score ${h.score.toFixed(4)}`;
    $("viewer-score").title = scoreKind;
    $("viewer-original").href = "/api/original/" + h.id + at(h);
    $("viewer").hidden = false;
    $("viewer-close").focus();
    if (h.explainable) explain(h);
    else why("");
  }

  function closeViewer() {
    if ($("viewer").hidden) return;
    $("viewer").hidden = true;
    $("viewer-image").removeAttribute("src");
    viewing = null;
  }

  function why(text, error) {
    $("viewer-why").textContent = text;
    $("viewer-why").className = error ? "error" : "";
  }

  // Why it matched (POST /api/explain): the query and the hit side by side, a line per
  // mutual nearest neighbour of their local descriptors, green where one geometry keeps it
  async function explain(h) {
    const params = new URLSearchParams({hit: h.id, v: h.version});
    const body = new FormData();
    if (h.query.file) body.append("image", h.query.file);
    else params.set("id", h.query.id);
    if (h.box) params.set("box", h.box.join(","));
    why("finding why it matched ...");
    let out;
    try {
      const res = await fetch("/api/explain?" + params, {method: "POST", body: body});
      try { out = await res.json(); } catch (e) { out = {}; }
      if (res.status === 401) askToken();
      if (!res.ok) { if (viewing === h) why(out.error || res.statusText, true); return; }
    } catch (e) {
      if (viewing === h) why("the server did not answer: " + e, true);
      return;
    }
    if (viewing !== h) return;       // another hit was opened meanwhile
    const hitImage = new Image();
    hitImage.onload = () => { if (viewing === h) drawMatch(out, h.queryImage, hitImage); };
    hitImage.onerror = () => why("the browser cannot show this file", true);
    hitImage.src = "/api/image/" + h.id + at(h);
  }

  function drawMatch(out, queryImage, hitImage) {
    const c = $("viewer-match"), g = c.getContext("2d");
    // drawn at the taller photo's height, small photos enlarged (to 480 px) and large
    // ones reduced (to 1200 px): the canvas is then shrunk to fit like the photo
    const height = Math.min(Math.max(queryImage.naturalHeight, hitImage.naturalHeight, 480),
                            1200);
    const sq = height / queryImage.naturalHeight, sh = height / hitImage.naturalHeight;
    const gap = Math.round(height / 60) + 4;
    const qw = Math.round(queryImage.naturalWidth * sq), hw = Math.round(hitImage.naturalWidth * sh);
    c.width = qw + gap + hw; c.height = height;
    g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
    g.drawImage(queryImage, 0, 0, qw, height);
    g.drawImage(hitImage, qw + gap, 0, hw, height);
    // the points are in pixels of the files at full size; the images here may be smaller
    // (a converted TIFF is served at its working size)
    const fq = qw / out.query_size[0], fh = hw / out.hit_size[0];
    const lw = Math.max(1.5, height / 250);
    if (out.box) {
      g.strokeStyle = "#00c853"; g.lineWidth = lw;
      g.strokeRect(out.box[0] * fq, out.box[1] * fq, (out.box[2] - out.box[0]) * fq,
                   (out.box[3] - out.box[1]) * fq);
    }
    const pairs = out.pairs.slice().sort((a, b) => a[5] - b[5]);   // inliers on top
    for (const [qx, qy, hx, hy, , inlier] of pairs) {
      g.strokeStyle = g.fillStyle = inlier ? "#00c853" : "rgba(200, 200, 200, 0.7)";
      g.lineWidth = inlier ? lw : lw / 2;
      const a = [qx * fq, qy * fq], b = [qw + gap + hx * fh, hy * fh];
      g.beginPath(); g.moveTo(a[0], a[1]); g.lineTo(b[0], b[1]); g.stroke();
      for (const p of [a, b]) { g.beginPath(); g.arc(p[0], p[1], lw * 1.6, 0, 7); g.fill(); }
    }
    c.dataset.inliers = out.inliers;
    c.dataset.pairs = out.correspondences;
    c.hidden = false;
    $("viewer-image").hidden = true;
    $("viewer-toggle").hidden = false;
    $("viewer-toggle").textContent = "photo only";
    why(`why it matched: ${out.inliers} of ${out.correspondences} mutual nearest ` +
        `neighbours of local features agree with one ${out.method} (green; ` +
        `${out.ms} ms)`);
  }

  $("viewer-toggle").addEventListener("click", () => {
    const showMatch = $("viewer-match").hidden;
    $("viewer-match").hidden = !showMatch;
    $("viewer-image").hidden = showMatch;
    $("viewer-toggle").textContent = showMatch ? "photo only" : "why it matched";
  });

  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-search").addEventListener("click", () => { if (viewing) useHit(viewing); });
  $("viewer").addEventListener("click", (ev) => {   // the dark margin closes it
    if (ev.target === $("viewer")) closeViewer();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") closeViewer();
  });

  // Duplicates: groups of near-identical photos (GET /api/duplicates), each a row of
  // thumbnails with each photo's best similarity in its group; a click opens the viewer.
  async function findDuplicates(ev) {
    ev.preventDefault();
    const t = Number($("dup_threshold").value);
    const st = $("dupstatus");
    if (!($("dup_threshold").value !== "" && t >= -1 && t <= 1)) {
      st.textContent = "the similarity must be a number from -1 to 1";
      st.className = "error";
      return;
    }
    st.className = "";
    st.textContent = "looking for duplicates ...";
    $("dupsearch").disabled = true;
    try {
      const res = await fetch("/api/duplicates?" + new URLSearchParams({threshold: t, k: 10}));
      let out;
      try { out = await res.json(); } catch (e) { out = {}; }
      if (res.status === 401) askToken();
      if (!res.ok) { st.textContent = out.error || res.statusText; st.className = "error"; return; }
      const box = $("dupgroups");
      box.replaceChildren();
      let photos = 0;
      out.groups.forEach((g, n) => {
        const row = document.createElement("div");
        row.className = "dupgroup";
        const head = document.createElement("p");
        head.textContent = `group ${n + 1}: ${g.images.length} photos, ` +
          (g.identical ? "the same file content" : `weakest link ${g.weakest_link.toFixed(4)}`);
        const tiles = document.createElement("div");
        tiles.className = "duptiles";
        const names = labels(g.images.map((im) => im.path));
        g.images.forEach((im, i) => {
          const h = {id: im.id, path: im.path, score: im.best, version: out.version};
          tiles.append(tile(h, names[i], `${im.path}\nbest similarity in the group ` +
                                         im.best.toFixed(4)));
        });
        photos += g.images.length;
        row.append(head, tiles);
        box.append(row);
      });
      st.textContent = out.groups.length ? `${out.groups.length} group(s), ${photos} of ` +
        `${out.images} photos, similarity at least ${t} (${out.ms} ms)` :
        `no duplicates at similarity ${t} among ${out.images} photos`;
    } catch (e) {
      st.textContent = "the server did not answer: " + e;
      st.className = "error";
    } finally {
      $("dupsearch").disabled = false;
    }
  }
  $("dupform").addEventListener("submit", findDuplicates);

  // A server bound beyond this machine has a token: the page asks for it once and keeps it
  // in a same-site cookie (sent with every request, the thumbnails' too) for 30 days.
  function askToken(message) {
    $("tokenform").hidden = false;
    $("tokenstatus").textContent = message || "";
    $("token").focus();
  }

  async function checkToken() {
    let res;
    try { res = await fetch("/api/health"); } catch (e) { return; }
    if (res.status === 401) {
      const had = document.cookie.split("; ").some((c) => c.startsWith("scvnet_token="));
      askToken(had ? "that token was not accepted" : "");
      return;
    }
    $("tokenform").hidden = true;
    if ($("facts").textContent === "\u2026" && res.ok) {
      const h = await res.json();
      $("facts").textContent = `${h.images} images \u00b7 ${h.family} descriptors \u00b7 ` +
                               `model ${h.weights || "unknown"}`;
    }
  }

  $("tokenform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    document.cookie = "scvnet_token=" + encodeURIComponent($("token").value) +
                      "; path=/; max-age=2592000; SameSite=Strict";
    $("token").value = "";
    checkToken();
  });
  checkToken();
})();
