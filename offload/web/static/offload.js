/* offload.js: the browser client of offload's web task API.
 *
 * No build step, no dependency: load it with
 *   <script src="https://api.example/offload/static/offload.js"></script>
 * and use the global `Offload`:
 *
 *   const api = new Offload("https://api.example/offload");
 *   const id = await api.submit("add", [1, 2]);          // POST /tasks/add
 *   const id2 = await api.rpc("add", [1, 2]);            // JSON-RPC 2.0, same thing
 *   const snap = await api.follow(id, s => bar.update(s)); // SSE, or polling with backoff
 *   const result = await api.result(id);                 // the result, or throws OffloadError
 *
 * A snapshot is the object GET {prefix}/tasks/{id} answers:
 *   {id, state, progress, result} or {id, state, error: {type, message}}.
 */
(function (global) {
  "use strict";

  var FINAL = { SUCCESS: true, FAILURE: true, REVOKED: true };

  /** An error from the API, a task, or the network: `type`, `message`, and `code` for JSON-RPC. */
  class OffloadError extends Error {
    constructor(type, message, extra) {
      super(message);
      this.name = "OffloadError";
      this.type = type;
      Object.assign(this, extra || {});
    }
  }

  function isFinal(snapshot) {
    return !!snapshot && FINAL[snapshot.state] === true;
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  class Offload {
    /**
     * @param {string} base  the API's URL, e.g. "https://api.example/offload"
     * @param {object} [options]  {credentials: "include" to send cookies cross-origin,
     *   pollInterval: first polling delay in ms (default 250), maxPollInterval (default 5000),
     *   sse: false to always poll}
     */
    constructor(base, options) {
      options = options || {};
      this.base = String(base).replace(/\/+$/, "");
      this.credentials = options.credentials || "same-origin";
      this.pollInterval = options.pollInterval || 250;
      this.maxPollInterval = options.maxPollInterval || 5000;
      this.sse = options.sse !== false && typeof global.EventSource === "function";
      this._rpcId = 0;
    }

    async _fetch(path, init) {
      var response;
      try {
        response = await fetch(this.base + path, Object.assign({ credentials: this.credentials }, init));
      } catch (err) {
        // A refused CORS check looks like this too: the browser hides the answer.
        throw new OffloadError("NetworkError", "could not reach " + this.base + " (" + err.message + ")");
      }
      if (response.status === 204) return { response: response, data: null };
      var data = null;
      try { data = await response.json(); } catch (err) { data = null; }
      if (!response.ok) {
        var error = (data && data.error) || { type: "HTTPError", message: "HTTP " + response.status };
        throw new OffloadError(error.type, error.message, { status: response.status });
      }
      return { response: response, data: data };
    }

    /** Start an exposed task; resolves with its id. */
    async submit(name, args, kwargs) {
      var answer = await this._fetch("/tasks/" + encodeURIComponent(name), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ args: args || [], kwargs: kwargs || {} }),
      });
      return answer.data.id;
    }

    /** The task's snapshot now, or (with waitSeconds) as soon as it ends. */
    async status(id, waitSeconds) {
      var query = waitSeconds ? "?wait=" + encodeURIComponent(waitSeconds) : "";
      return (await this._fetch("/tasks/" + encodeURIComponent(id) + query, { method: "GET" })).data;
    }

    /** Long-poll until the task ends; resolves with the final snapshot. */
    async wait(id, waitSeconds) {
      for (;;) {
        var snapshot = await this.status(id, waitSeconds || 25);
        if (isFinal(snapshot)) return snapshot;
      }
    }

    /** Revoke a task (running work is not stopped unless terminate is true). */
    async cancel(id, terminate) {
      var query = terminate ? "?terminate=true" : "";
      return (await this._fetch("/tasks/" + encodeURIComponent(id) + query, { method: "DELETE" })).data;
    }

    /** The task's result, or an OffloadError with the task's error type and message. */
    async result(id) {
      var snapshot = await this.follow(id);
      if (snapshot.error) throw new OffloadError(snapshot.error.type, snapshot.error.message, { snapshot: snapshot });
      return snapshot.result;
    }

    /**
     * Call onUpdate(snapshot) on each change of state or progress; resolves with the final one.
     * Uses server-sent events, and falls back to polling (with backoff) when they fail.
     */
    follow(id, onUpdate) {
      var self = this;
      var notify = typeof onUpdate === "function" ? onUpdate : function () {};
      if (!this.sse) return this._poll(id, notify);
      return new Promise(function (resolve, reject) {
        var url = self.base + "/tasks/" + encodeURIComponent(id) + "/events";
        var source = new EventSource(url, { withCredentials: self.credentials === "include" });
        var heard = false;
        source.onmessage = function (event) {
          heard = true;
          var snapshot;
          try { snapshot = JSON.parse(event.data); } catch (err) { return; }
          notify(snapshot);
          if (isFinal(snapshot)) {
            source.close();
            resolve(snapshot);
          }
        };
        source.onerror = function () {
          // The stream closed without a final state (a proxy, a timeout, a
          // refused CORS check): EventSource would retry, but polling is the
          // fallback that always works.
          if (source.readyState === EventSource.CLOSED || !heard) {
            source.close();
            self._poll(id, notify).then(resolve, reject);
          }
        };
      });
    }

    async _poll(id, notify) {
      var delay = this.pollInterval;
      var last = null;
      for (;;) {
        var snapshot = await this.status(id);
        var text = JSON.stringify(snapshot);
        if (text !== last) {
          last = text;
          notify(snapshot);
          delay = this.pollInterval;  // something moved: look again soon
        } else {
          delay = Math.min(delay * 2, this.maxPollInterval);
        }
        if (isFinal(snapshot)) return snapshot;
        await sleep(delay);
      }
    }

    /** A JSON-RPC 2.0 call; resolves with its result, rejects with OffloadError (with .code). */
    async rpc(method, params) {
      var id = ++this._rpcId;
      var answer = await this._fetch("/rpc", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", method: method, params: params || [], id: id }),
      });
      var data = answer.data;
      if (data.error) {
        throw new OffloadError((data.error.data && data.error.data.type) || "RPCError", data.error.message,
          { code: data.error.code, data: data.error.data });
      }
      return data.result;
    }

    /** A JSON-RPC notification: no answer is awaited but the HTTP call. */
    async notify(method, params) {
      await this._fetch("/rpc", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", method: method, params: params || [] }),
      });
    }
  }

  /**
   * A progress bar in `container` (an element or a CSS selector): a <progress> and a line of text.
   * Returns {element, update(snapshot)}; pass `update` to api.follow().
   */
  function progressBar(container) {
    var root = typeof container === "string" ? document.querySelector(container) : container;
    var wrap = document.createElement("div");
    wrap.className = "offload-progress";
    var bar = document.createElement("progress");
    bar.max = 100;
    var label = document.createElement("span");
    label.className = "offload-progress-label";
    label.setAttribute("aria-live", "polite");
    wrap.appendChild(bar);
    wrap.appendChild(document.createTextNode(" "));
    wrap.appendChild(label);
    root.appendChild(wrap);
    function update(snapshot) {
      wrap.dataset.state = snapshot.state;
      var p = snapshot.progress;
      if (snapshot.state === "SUCCESS") {
        bar.value = 100;
        label.textContent = "done: " + JSON.stringify(snapshot.result);
      } else if (snapshot.error) {
        label.textContent = snapshot.error.type + ": " + snapshot.error.message;
      } else if (p && typeof p.percent === "number") {
        bar.value = p.percent;
        label.textContent = p.percent + "%" + (p.message ? " " + p.message : "");
      } else {
        bar.removeAttribute("value");  // indeterminate
        label.textContent = snapshot.state.toLowerCase();
      }
    }
    return { element: wrap, update: update };
  }

  Offload.OffloadError = OffloadError;
  Offload.isFinal = isFinal;
  Offload.progressBar = progressBar;
  global.Offload = Offload;
})(typeof window !== "undefined" ? window : globalThis);
