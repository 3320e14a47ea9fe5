// scvnet-search: the page's only script (no libraries). Upload or drop an image, draw a
// box on it, search; the proposed regions are drawn on the query; click a hit to search
// with it.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  let query = null;      // {file: File} or {id: number}
  let image = null;      // the query as an HTMLImageElement
  let box = null;        // [x1, y1, x2, y2] in image pixels
  let regions = [];      // proposed regions of the last search
  let drag = null;

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
    im.onerror = () => status("the browser cannot show this image", true);
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

  async function search() {
    if (!query) return;
    const params = new URLSearchParams({k: $("k").value, rerank: $("rerank").value,
                                        regions: $("regions").value});
    if (box) params.set("box", box.join(","));
    const body = new FormData();
    if (query.file) body.append("image", query.file);
    else params.set("id", query.id);
    status("searching ...");
    $("search").disabled = true;
    try {
      const res = await fetch("/api/search?" + params, {method: "POST", body: body});
      const out = await res.json();
      if (!res.ok) { status(out.error || res.statusText, true); return; }
      regions = out.regions || [];
      draw();
      grid(out.hits);
      status(`${out.hits.length} hits in ${out.timings.search_ms} ms ` +
             `(${out.timings.total_ms} ms in all)` +
             (regions.length ? `; ${regions.length} regions searched too` : ""));
    } catch (e) {
      status("the server did not answer: " + e, true);
    } finally {
      $("search").disabled = false;
    }
  }

  function grid(hits) {
    const g = $("grid");
    g.replaceChildren();
    for (const h of hits) {
      const div = document.createElement("div");
      div.className = "hit";
      div.dataset.id = h.id;
      div.dataset.path = h.path;
      div.title = h.path + " (click: search with it)";
      const img = document.createElement("img");
      img.src = "/api/image/" + h.id;
      img.alt = h.path;
      const score = document.createElement("div");
      score.className = "score";
      score.textContent = h.score.toFixed(4);
      const name = document.createElement("div");
      name.className = "name";
      name.textContent = h.path.split("/").pop();
      div.append(img, score, name);
      div.addEventListener("click", () => show("/api/image/" + h.id, {id: h.id}));
      g.append(div);
    }
  }
})();
