// The shell: the header, sign-in, and hash routing (#/experiments, #/experiments/7/curves, #/trials/12, ...).
// Each page gets a context with an AbortSignal that ends when the user goes elsewhere (streams, timers).
import * as api from "./api.js";
import { h, clear, errorBox } from "./dom.js";
import { ROUTES, NAV } from "./pages.js";

const header = document.getElementById("top");
const view = document.getElementById("view");
let current = null; // the AbortController of the page on screen
let notice = "";

function parseHash() {
  const raw = decodeURIComponent(location.hash.slice(1)) || "/experiments";
  const q = raw.indexOf("?");
  return { path: q < 0 ? raw : raw.slice(0, q), query: new URLSearchParams(q < 0 ? "" : raw.slice(q + 1)) };
}

function renderHeader(user, path) {
  clear(header,
    h("a.brand", { href: "#/experiments" }, "Kiln"),
    h("nav", user ? NAV.map((n) => h("a", { href: n.href, class: n.match.test(path) ? "active" : null }, n.label)) : []),
    h("span.spacer"),
    h("a", { href: "/schema", title: "The HTTP API's OpenAPI documentation" }, "API docs"),
    user ? h("span.user", { dataset: { user: user.username } }, user.username, user.admin ? " (admin)" : "") : null,
    user ? h("button.link", { type: "button", onclick: signOut }, "Sign out") : null,
  );
}

async function signOut() {
  try {
    await api.logout();
  } catch { /* signed out here either way */ }
  notice = "Signed out.";
  route();
}

function showLogin() {
  const error = h("div.error", { role: "alert", hidden: !notice }, notice);
  notice = "";
  const username = h("input", { name: "username", autocomplete: "username", required: true, autofocus: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit" }, "Sign in");
  const form = h("form.login", {
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      error.hidden = true;
      try {
        await api.login(username.value, password.value);
        route();
      } catch (err) {
        error.textContent = err.status === 401 ? "Wrong username or password." : err.message;
        error.hidden = false;
        password.select();
      } finally {
        submit.disabled = false;
      }
    },
  },
  h("h1", "Sign in to Kiln"),
  h("label", "Username", username),
  h("label", "Password", password),
  error,
  submit,
  h("p.muted", "The same accounts as the CLI (`kiln user login`)."));
  clear(view, form);
  username.focus();
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const { path, query } = parseHash();
  const user = api.signedIn();
  renderHeader(user, path);
  document.title = "Kiln";
  if (!user) return showLogin();
  const page = h("div.page");
  clear(view, page);
  const signal = current.signal;
  for (const r of ROUTES) {
    const m = r.pattern.exec(path);
    if (!m) continue;
    const ctx = {
      user, query, params: m.slice(1), signal,
      // Repeats fn every ms while the page is on screen.
      every(ms, fn) {
        const id = setInterval(() => { if (!signal.aborted) fn(); }, ms);
        signal.addEventListener("abort", () => clearInterval(id));
      },
      // Changes the hash without rendering the page again (a tab, a filter).
      replace(hash) { history.replaceState(null, "", hash); },
    };
    try {
      await r.render(page, ctx);
    } catch (err) {
      if (err.name !== "AbortError" && !signal.aborted) page.append(errorBox(err));
    }
    return;
  }
  page.append(h("div.error", `No page at ${path}.`));
}

api.whenSignedOut((detail) => {
  notice = `Signed out: ${detail}`;
  route();
});
window.addEventListener("hashchange", route);
route();
