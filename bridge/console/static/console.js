// qlm-bridge console: progressive enhancement only. The pages work without this file.
// - relative times ("3 min ago") tick while the page is open;
// - pages marked data-live="N" refresh their [data-part] sections every N seconds (paused
//   while rows are selected, a field has focus, or the tab is hidden);
// - a site <select data-autosubmit> submits on change; "Replay selected" needs a selection.
(function () {
  "use strict";

  function ago(date, now) {
    var s = (now - date) / 1000, future = s < 0, text;
    s = Math.abs(s);
    if (s < 2) return "just now";
    if (s >= 86400) text = Math.floor(s / 86400) + " d";
    else if (s >= 3600) text = Math.floor(s / 3600) + " h";
    else if (s >= 60) text = Math.floor(s / 60) + " min";
    else text = Math.floor(s) + " s";
    return future ? "in " + text : text + " ago";
  }

  function tick(root) {
    var now = Date.now();
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var t = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(t)) el.textContent = ago(t, now);
    });
  }

  function busy() {
    if (document.hidden) return true;
    if (document.querySelector("input[type=checkbox]:checked")) return true;
    var a = document.activeElement;
    return !!(a && a.form && a.tagName !== "BUTTON");
  }

  function refresh(main, status) {
    if (busy()) { status.textContent = "paused"; return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { if (!r.ok || r.redirected) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        main.querySelectorAll("[data-part]").forEach(function (part) {
          if (part.dataset.touched) return;
          var fresh = doc.querySelector('[data-part="' + part.dataset.part + '"]');
          if (fresh) part.replaceWith(document.importNode(fresh, true));
        });
        wire(main);
        status.textContent = "live";
        status.classList.remove("stale");
      })
      .catch(function () { status.textContent = "offline"; status.classList.add("stale"); });
  }

  function wire(root) {
    tick(root);
    root.querySelectorAll("[data-part] details").forEach(function (d) {
      d.addEventListener("toggle", function () {
        var part = d.closest("[data-part]");
        if (part) part.dataset.touched = "1";
      });
    });
    var form = document.getElementById("replay-selected");
    if (form) {
      var button = form.querySelector("[data-needs-selection]");
      var update = function () {
        if (button) button.disabled = !form.querySelector("input[name=event_id]:checked");
      };
      form.addEventListener("change", update);
      update();
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var main = document.getElementById("main");
    wire(document);
    document.querySelectorAll("select[data-autosubmit]").forEach(function (s) {
      s.addEventListener("change", function () { s.form.submit(); });
    });
    setInterval(function () { tick(document); }, 10000);
    var every = main && parseFloat(main.dataset.live || "0");
    var status = document.querySelector("[data-live-status]");
    if (every > 0 && status) {
      setInterval(function () { refresh(main, status); }, every * 1000);
    } else if (status) {
      status.textContent = "";
    }
  });
})();
