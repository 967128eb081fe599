// The chat page of dllama-api: plain JS, no dependencies, everything from this server (see docs/api.md).
// Conversations, settings and the API key live in this browser's localStorage, never on the server.
"use strict";

const $ = (id) => document.getElementById(id);

const store = {
  get(key, fallback) {
    try {
      const v = localStorage.getItem("dllama." + key);
      return v === null ? fallback : JSON.parse(v);
    } catch (e) {
      return fallback;   // storage off or a value from another version: start clean rather than break
    }
  },
  set(key, value) { localStorage.setItem("dllama." + key, JSON.stringify(value)); },
  remove(key) { localStorage.removeItem("dllama." + key); },
};

const DEFAULTS = { system: "", temperature: 0.8, top_p: 0.9, max_tokens: 512 };
const state = {
  conversations: store.get("conversations", []),   // [{id, title, messages: [{role, content, stats}]}]
  current: store.get("current", null),
  settings: Object.assign({}, DEFAULTS, store.get("settings", {})),
  apiKey: store.get("apiKey", ""),
  model: null,
  controller: null,   // the AbortController of the reply being streamed
};

// ---- Markdown: HTML is escaped first, then only the tags below are made, so model output cannot inject
// markup; links are http(s) only.

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function inline(s) {
  const codes = [];   // code spans are set aside so their content gets no other formatting
  s = s.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\s][^*\n]*)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
}

const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+/;
const FENCE = /^\s*```/;

function renderMarkdown(src) {
  const lines = escapeHtml(src.replace(/\u0000/g, "")).split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    let m;
    if (fence) {
      const body = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
      i++;   // the closing fence, or the end of a reply still streaming
      out.push(`<div class="code"><div class="code-head"><span>${fence[1]}</span>` +
        `<button type="button" class="copy-code">Copy</button></div><pre><code>${body.join("\n")}</code></pre></div>`);
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
      i++;
    } else if (LIST_ITEM.test(line)) {
      const tag = /^\s*\d/.test(line) ? "ol" : "ul";
      const items = [];
      for (; i < lines.length && LIST_ITEM.test(lines[i]); i++) items.push("<li>" + inline(lines[i].replace(LIST_ITEM, "")) + "</li>");
      out.push(`<${tag}>${items.join("")}</${tag}>`);
    } else if (/^&gt;\s?/.test(line)) {
      const quote = [];
      for (; i < lines.length && /^&gt;\s?/.test(lines[i]); i++) quote.push(inline(lines[i].replace(/^&gt;\s?/, "")));
      out.push(`<blockquote>${quote.join("<br>")}</blockquote>`);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [lines[i++]];
      for (; i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !/^#{1,6}\s/.test(lines[i]) &&
        !LIST_ITEM.test(lines[i]); i++) para.push(lines[i]);
      out.push("<p>" + inline(para.join("\n")).replace(/\n/g, "<br>") + "</p>");
    }
  }
  return out.join("");
}

// ---- the API, with the key asked for on a 401

let keyPrompt = null;   // one dialog for every request that got a 401 meanwhile

function askKey(required) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve, reject) => {
      const dialog = $("key-dialog");
      $("key-input").value = state.apiKey;
      $("key-dialog").querySelector("p").textContent = required
        ? "This server requires an API key." : "The API key this page sends (kept in this browser).";
      dialog.addEventListener("close", () => {
        keyPrompt = null;
        if (dialog.returnValue === "save" && $("key-input").value.trim()) {
          state.apiKey = $("key-input").value.trim();
          store.set("apiKey", state.apiKey);
          resolve();
        } else {
          if (dialog.returnValue === "forget") { state.apiKey = ""; store.remove("apiKey"); }
          reject(new Error("an API key is required"));
        }
      }, { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }
  return keyPrompt;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  if (state.apiKey) headers.Authorization = "Bearer " + state.apiKey;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status !== 401) return r;
  await askKey(true);
  return api(path, options);
}

async function errorText(r) {
  try {
    return (await r.json()).error.message;
  } catch (e) {
    return `HTTP ${r.status}`;
  }
}

// ---- model and cluster

async function refreshCluster() {
  let r;
  try {
    r = await api("/v1/cluster");
  } catch (e) {
    $("model-name").textContent = e.message;
    return;
  }
  if (r.status === 503) {
    $("model-name").textContent = "model loading…";
    setTimeout(refreshCluster, 2000);
    return;
  }
  if (!r.ok) { showError(await errorText(r)); return; }
  const info = await r.json();
  state.model = info.model;
  $("model-name").textContent = info.model;
  $("model-context").textContent = `context ${info.context_length} tokens`;
  const fmt = (v, digits) => (v === null || v === undefined ? "—" : v.toFixed(digits));
  $("nodes").tBodies[0].replaceChildren(...info.nodes.map((n) => {
    const tr = document.createElement("tr");
    for (const text of [n.address, n.share === null ? "—" : Math.round(100 * n.share) + "%",
      fmt(n.inference_ms, 1) + (n.inference_ms === null ? "" : " ms"),
      fmt(n.transfer_ms, 1) + (n.transfer_ms === null ? "" : " ms")]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  }));
  $("cluster-note").textContent = info.nodes.length > 1
    ? "per token, latest reply, as each node measured it; transfer includes waiting for the other nodes"
    : "per token, latest reply";
}

// ---- conversations

function save() {
  store.set("conversations", state.conversations);
  store.set("current", state.current);
}

function currentConversation() {
  let conv = state.conversations.find((c) => c.id === state.current);
  if (!conv) {
    conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
    state.conversations.unshift(conv);
    state.current = conv.id;
  }
  return conv;
}

function renderConversations() {
  $("conversations").replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.className = c.id === state.current ? "active" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.onclick = () => { if (!state.controller) { state.current = c.id; save(); renderAll(); } };
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = "Delete this conversation";
    del.textContent = "×";
    del.onclick = () => {
      if (state.controller && c.id === state.current) return;
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = state.conversations.length ? state.conversations[0].id : null;
      save();
      renderAll();
    };
    li.append(open, del);
    return li;
  }));
}

function messageElement(m, index) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.index = index;
  const body = document.createElement("div");
  body.className = "content";
  if (m.role === "assistant") body.innerHTML = renderMarkdown(m.content);
  else body.textContent = m.content;
  div.append(body);
  if (m.role === "assistant") {
    const foot = document.createElement("div");
    foot.className = "foot";
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = m.stats || "";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-msg";
    copy.textContent = "Copy";
    foot.append(stats, copy);
    div.append(foot);
  }
  return div;
}

function renderMessages() {
  const conv = state.conversations.find((c) => c.id === state.current);
  $("messages").replaceChildren(...(conv ? conv.messages.map(messageElement) : []));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function renderAll() {
  renderConversations();
  renderMessages();
}

let renderPending = false;

function renderLast(reply) {   // at most once a frame while tokens stream in
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    const last = $("messages").lastElementChild;
    if (!last) return;
    last.querySelector(".content").innerHTML = renderMarkdown(reply.content);
    last.querySelector(".stats").textContent = reply.stats || "";
    $("messages").scrollTop = $("messages").scrollHeight;
  });
}

// ---- sending and streaming

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

function requestBody(conv) {
  const s = state.settings;
  const messages = s.system.trim() ? [{ role: "system", content: s.system }] : [];
  for (const m of conv.messages.slice(0, -1)) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true },
    temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens };
  if (state.model) body.model = state.model;
  return body;
}

// Reads the SSE stream; calls onEvent with each parsed `data:` object until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function describe(run) {
  // tokens/s over the decode phase: the tokens after the first, over the time after the first
  const tokens = run.usage ? run.usage.completion_tokens : run.pieces;
  const parts = [];
  if (run.firstAt !== null && tokens > 1 && run.endAt > run.firstAt) {
    parts.push(`${((tokens - 1) / ((run.endAt - run.firstAt) / 1000)).toFixed(1)} tokens/s`);
  }
  if (run.firstAt !== null) parts.push(`first token ${((run.firstAt - run.startAt) / 1000).toFixed(2)} s`);
  parts.push(`${tokens} tokens${run.usage ? "" : " (counted as received)"}`);
  if (run.stopped) parts.push("stopped");
  else if (run.finish === "length") parts.push("hit max tokens");
  return parts.join(" · ");
}

async function send(text) {
  showError("");
  const conv = currentConversation();
  if (!conv.messages.length) conv.title = text.slice(0, 48);
  conv.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", stats: "" };
  conv.messages.push(reply);
  save();
  renderAll();
  const run = { startAt: performance.now(), firstAt: null, endAt: null, pieces: 0, usage: null, finish: null, stopped: false };
  state.controller = new AbortController();
  setBusy(true);
  try {
    const r = await api("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(conv)), signal: state.controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    await readEvents(r, (obj) => {
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) run.usage = obj.usage;
      const choice = obj.choices && obj.choices[0];
      if (!choice) return;
      if (choice.finish_reason) run.finish = choice.finish_reason;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (run.firstAt === null) run.firstAt = performance.now();
        run.pieces++;
        reply.content += piece;
        renderLast(reply);
      }
    });
  } catch (e) {
    if (e.name === "AbortError") run.stopped = true;
    else showError(e.message);
  } finally {
    run.endAt = performance.now();
    reply.stats = describe(run);
    state.controller = null;
    setBusy(false);
    save();
    renderLast(reply);
    $("prompt").focus();
    refreshCluster();
  }
}

// ---- copying: the clipboard API exists only on https or localhost, so plain http falls back

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  return Promise.resolve();
}

function flash(button) {
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1200);
}

// ---- wiring

function bindSettings() {
  const fields = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };
  for (const [key, id] of Object.entries(fields)) {
    const el = $(id);
    el.value = state.settings[key];
    el.addEventListener("input", () => {
      const v = key === "system" ? el.value : Number(el.value);
      state.settings[key] = key === "system" || (Number.isFinite(v) && el.value !== "") ? v : DEFAULTS[key];
      store.set("settings", state.settings);
    });
  }
}

function init() {
  bindSettings();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) return;
    state.current = null;
    currentConversation();
    save();
    renderAll();
    $("prompt").focus();
  });
  $("key-button").addEventListener("click", () => askKey(false).then(refreshCluster, () => {}));
  $("messages").addEventListener("click", (e) => {
    const button = e.target.closest("button");
    if (!button) return;
    if (button.classList.contains("copy-code")) {
      copyText(button.closest(".code").querySelector("code").textContent).then(() => flash(button));
    } else if (button.classList.contains("copy-msg")) {
      const conv = currentConversation();
      copyText(conv.messages[+button.closest(".msg").dataset.index].content).then(() => flash(button));
    }
  });
  renderAll();
  refreshCluster();
  setInterval(() => { if (!state.controller && $("cluster").open && !keyPrompt) refreshCluster(); }, 10000);
}

window.dllamaRenderMarkdown = renderMarkdown;   // for the browser test of the renderer
document.addEventListener("DOMContentLoaded", init);
