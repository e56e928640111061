/* The dashboard's live updates. The server renders every section; this
   script only swaps in fresh ones: over server-sent events, or by polling
   when a proxy or browser will not keep a stream open. Without it the page
   still shows everything as of its load. */
(function () {
  "use strict";
  var main = document.querySelector("main[data-stream]");
  if (!main) return;
  var live = document.getElementById("live");
  var POLL_MS = 3000;
  var failures = 0, polling = null, source = null;

  function mark(how) {
    live.dataset.live = how;
    live.textContent = how === "sse" ? "live" : how === "poll" ? "live (polling)" : "reconnecting…";
  }

  function apply(data) {
    Object.keys(data).forEach(function (key) {
      var value = data[key];
      if (typeof value !== "string") return;
      var el = document.getElementById(key);
      // Leave a section alone while someone uses a control in it.
      if (!el || el.contains(document.activeElement) && document.activeElement !== document.body) return;
      if (el.innerHTML !== value) el.innerHTML = value;
    });
    var actions = document.getElementById("actions");
    if (actions && data.state) {
      actions.dataset.state = data.state;
      actions.querySelectorAll("[data-when=unfinished]").forEach(function (form) {
        form.hidden = !!data.final;
      });
    }
  }

  function poll() {
    if (polling) return;
    mark("poll");
    var url = main.dataset.fragments + (main.dataset.task ? "" : location.search);
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (data) { mark("poll"); apply(data); })
        .catch(function () { mark("off"); });
    }
    tick();
    polling = setInterval(tick, POLL_MS);
  }

  function stream() {
    if (!window.EventSource) return poll();
    var url = main.dataset.stream;
    if (!main.dataset.task && location.search) url += location.search;
    source = new EventSource(url);
    source.onmessage = function (event) {
      failures = 0;
      mark("sse");
      try { apply(JSON.parse(event.data)); } catch (err) { /* a bad event: wait for the next */ }
    };
    source.onerror = function () {
      failures += 1;
      mark("off");
      // The browser reconnects by itself; after a few failures in a row,
      // something in between will not stream: poll instead.
      if (failures >= 3) { source.close(); poll(); }
    };
  }

  stream();
})();
