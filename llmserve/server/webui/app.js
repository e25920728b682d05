// The chat page: talks to this server's OpenAI-compatible API, keeps conversations in
// localStorage, streams answers over the SSE of /v1/chat/completions (fetch + ReadableStream,
// so the request can carry an API key and be aborted: aborting closes the connection, and the
// server frees the slot).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const STORE = {
    conversations: "llmserve.conversations",
    settings: "llmserve.settings",
    key: "llmserve.apiKey",
    model: "llmserve.model",
  };
  const SAMPLERS = ["temperature", "top_p", "top_k", "min_p", "max_tokens"];
  const INTEGER_SAMPLERS = new Set(["top_k", "max_tokens"]);

  const ui = {
    app: $("app"),
    sidebar: $("sidebar"),
    openSidebar: $("open-sidebar"),
    closeSidebar: $("close-sidebar"),
    newChat: $("new-chat"),
    list: $("conversations"),
    picker: $("model"),
    modelStatus: $("model-status"),
    openSettings: $("open-settings"),
    closeSettings: $("close-settings"),
    settings: $("settings"),
    settingsForm: $("settings-form"),
    resetSettings: $("reset-settings"),
    keyState: $("key-state"),
    changeKey: $("change-key"),
    forgetKey: $("forget-key"),
    error: $("error"),
    errorText: $("error-text"),
    errorClose: $("error-close"),
    keyForm: $("key-form"),
    keyReason: $("key-reason"),
    keyInput: $("api-key"),
    announce: $("announce"),
    messages: $("messages"),
    empty: $("empty"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- storage --------------------------------------------------------------------------------

  function load(key, fallback) {
    try {
      const value = localStorage.getItem(key);
      return value === null ? fallback : JSON.parse(value);
    } catch (_) {
      return fallback;
    }
  }

  function store(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      showError("This browser would not save the conversation: " + e.message);
    }
  }

  let conversations = load(STORE.conversations, []);
  if (!Array.isArray(conversations)) conversations = [];
  let current = null;
  let apiKey = load(STORE.key, "");
  let controller = null; // the AbortController of the answer streaming now

  function saveConversations() {
    store(STORE.conversations, conversations);
  }

  // -- the API --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  async function api(path, { body, signal } = {}) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    let res;
    try {
      res = await fetch(path, {
        method: body === undefined ? "GET" : "POST",
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, e.message);
    }
    if (!res.ok) throw await errorOf(res);
    return res;
  }

  async function errorOf(res) {
    let message = res.statusText || "no reason given";
    try {
      const body = await res.json();
      const error = body.error || body;
      message = error.message || error.detail || message;
    } catch (_) {
      // not JSON: keep the status text
    }
    return new ApiError(res.status, message, res.headers.get("Retry-After"));
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return "The page failed: " + err.message;
    const status = err.status;
    const message = err.message.replace(/\.$/, "");
    const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
    if (status === 0) return `Cannot reach the server (is llmserve still running?): ${message}.`;
    if (status === 429) return `Too many requests (429): ${message}.${wait}`;
    if (status === 503) return `The server cannot take this now (503): ${message}.${wait}`;
    if (status >= 500) return `The server failed (${status}): ${message}.`;
    return `The server refused the request (${status}): ${message}.`;
  }

  function handle(err) {
    if (err instanceof ApiError && err.status === 401) askForKey(err.message);
    else showError(describe(err));
  }

  function showError(text) {
    ui.errorText.textContent = text;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
  }

  // -- the API key ----------------------------------------------------------------------------

  function askForKey(message) {
    ui.keyReason.textContent = apiKey
      ? `The server refused the saved API key (${message}). Enter another.`
      : "This server needs an API key.";
    ui.keyForm.hidden = false;
    ui.keyInput.value = "";
    ui.keyInput.focus();
  }

  function setKey(key) {
    apiKey = key;
    if (key) store(STORE.key, key);
    else localStorage.removeItem(STORE.key);
    ui.keyState.textContent = key ? "A key is saved in this browser." : "No key saved.";
    ui.forgetKey.hidden = !key;
    ui.changeKey.textContent = key ? "Change the API key" : "Set API key";
  }

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    setKey(key);
    ui.keyForm.hidden = true;
    hideError();
    loadModels();
    ui.prompt.focus();
  });
  ui.changeKey.addEventListener("click", () => {
    closeSettings();
    ui.keyReason.textContent = "Enter the server's API key.";
    ui.keyForm.hidden = false;
    ui.keyInput.focus();
  });
  ui.forgetKey.addEventListener("click", () => setKey(""));

  // -- models ---------------------------------------------------------------------------------

  function placeholderOption(text) {
    const option = el("option", null, text);
    option.value = ""; // no model named: the server's default
    return option;
  }

  async function loadModels() {
    let models;
    try {
      models = (await (await api("/v1/models")).json()).data || [];
    } catch (e) {
      ui.picker.replaceChildren(placeholderOption("No model list"));
      ui.picker.disabled = true;
      handle(e);
      return;
    }
    const wanted = (current && current.model) || load(STORE.model, "");
    ui.picker.replaceChildren();
    for (const model of models) {
      const option = el("option", null, model.id + (model.state === "loaded" ? "" : " (not loaded)"));
      option.value = model.id;
      option.dataset.state = model.state || "loaded";
      ui.picker.appendChild(option);
    }
    if (!models.length) {
      ui.picker.appendChild(placeholderOption("No models"));
      ui.picker.disabled = true;
      return;
    }
    const ids = models.map((m) => m.id);
    const loaded = models.find((m) => m.state === "loaded");
    ui.picker.value = ids.includes(wanted) ? wanted : (loaded || models[0]).id;
    ui.picker.disabled = Boolean(controller);
  }

  // Picking a model loads it now (JIT), so the first question does not wait for the load.
  async function pickModel() {
    const id = ui.picker.value;
    store(STORE.model, id);
    if (current) current.model = id;
    const option = ui.picker.selectedOptions[0];
    if (!option || option.dataset.state === "loaded") return;
    ui.modelStatus.textContent = `Loading ${id}…`;
    ui.picker.disabled = true;
    ui.send.disabled = true;
    try {
      await api("/v1/models/load", { body: { model: id } });
      ui.modelStatus.textContent = `${id} is loaded`;
    } catch (e) {
      ui.modelStatus.textContent = "";
      handle(e);
    } finally {
      ui.send.disabled = false;
      await loadModels(); // loading one may have unloaded another
    }
  }

  ui.picker.addEventListener("change", pickModel);

  // -- settings -------------------------------------------------------------------------------

  const FIELDS = ["system", ...SAMPLERS];

  function readSettings() {
    const saved = load(STORE.settings, {});
    for (const name of FIELDS) $(name).value = typeof saved[name] === "string" ? saved[name] : "";
  }

  function saveSettings() {
    const values = {};
    for (const name of FIELDS) values[name] = $(name).value;
    store(STORE.settings, values);
  }

  // The request fields the settings add; an empty field is left to the server.
  function samplerFields() {
    const out = {};
    for (const name of SAMPLERS) {
      const raw = $(name).value.trim();
      if (raw === "") continue;
      const value = Number(raw);
      out[name] = Number.isFinite(value) && INTEGER_SAMPLERS.has(name) ? Math.trunc(value) : value;
    }
    return out;
  }

  ui.settingsForm.addEventListener("input", saveSettings);
  ui.settingsForm.addEventListener("submit", (event) => event.preventDefault());
  ui.resetSettings.addEventListener("click", () => {
    for (const name of FIELDS) $(name).value = "";
    saveSettings();
  });

  function openSettings() {
    ui.settings.hidden = false;
    ui.openSettings.setAttribute("aria-expanded", "true");
    $("system").focus();
  }

  function closeSettings() {
    if (ui.settings.hidden) return;
    ui.settings.hidden = true;
    ui.openSettings.setAttribute("aria-expanded", "false");
    ui.openSettings.focus();
  }

  ui.openSettings.addEventListener("click", () => (ui.settings.hidden ? openSettings() : closeSettings()));
  ui.closeSettings.addEventListener("click", closeSettings);

  // -- conversations --------------------------------------------------------------------------

  function newConversation() {
    return { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "",
             model: ui.picker.value, messages: [], updated: Date.now() };
  }

  function startNew() {
    if (controller) return;
    current = newConversation();
    renderMessages();
    renderList();
    closeSidebar();
    ui.prompt.focus();
  }

  function select(conversation) {
    if (controller) return;
    current = conversation;
    if (conversation.model && [...ui.picker.options].some((o) => o.value === conversation.model)) {
      ui.picker.value = conversation.model;
    }
    renderMessages();
    renderList();
    closeSidebar();
  }

  function remove(conversation) {
    if (controller && conversation === current) return;
    conversations = conversations.filter((c) => c !== conversation);
    saveConversations();
    if (conversation === current) current = newConversation();
    renderMessages();
    renderList();
  }

  function renderList() {
    ui.list.replaceChildren();
    const sorted = [...conversations].sort((a, b) => b.updated - a.updated);
    for (const conversation of sorted) {
      const item = el("li", conversation === current ? "active" : null);
      const open = el("button", "conversation-open", conversation.title || "New chat");
      open.type = "button";
      open.title = conversation.title;
      if (conversation === current) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => select(conversation));
      const del = el("button", "conversation-delete icon-button", "✕");
      del.type = "button";
      del.setAttribute("aria-label", `Delete the conversation “${conversation.title}”`);
      del.addEventListener("click", () => remove(conversation));
      item.append(open, del);
      ui.list.appendChild(item);
    }
  }

  ui.newChat.addEventListener("click", startNew);

  function openSidebar() {
    ui.app.classList.add("sidebar-open");
    ui.openSidebar.setAttribute("aria-expanded", "true");
    ui.newChat.focus();
  }

  function closeSidebar() {
    if (!ui.app.classList.contains("sidebar-open")) return;
    ui.app.classList.remove("sidebar-open");
    ui.openSidebar.setAttribute("aria-expanded", "false");
  }

  ui.openSidebar.addEventListener("click", openSidebar);
  // at phone width the open list covers the chat: a tap beside it closes it
  document.querySelector(".main").addEventListener("click", (event) => {
    if (event.target === event.currentTarget) closeSidebar();
  });
  ui.closeSidebar.addEventListener("click", closeSidebar);

  // -- messages -------------------------------------------------------------------------------

  // A <think>…</think> block at the start of the text is reasoning (models whose template does
  // not split it out); it may still be open while the answer streams.
  function parts(message) {
    let text = message.content || "";
    let reasoning = message.reasoning || "";
    const think = /^\s*<think>([\s\S]*?)(<\/think>|$)/.exec(text);
    if (think) {
      reasoning += think[1];
      text = text.slice(think[0].length);
    }
    return { reasoning: reasoning.trim(), text: text.replace(/^\s+/, "") };
  }

  function statsText(stats) {
    const out = [];
    if (stats.tokens !== undefined) out.push(`${stats.tokens} tokens`);
    if (stats.tps) out.push(`${stats.tps.toFixed(1)} tokens/s`);
    if (stats.cached !== undefined) out.push(`${stats.cached} cached`);
    if (stats.ttft !== undefined) out.push(`first token ${stats.ttft.toFixed(2)} s`);
    if (stats.finish === "length") out.push("cut at max tokens");
    return out.join(" · ");
  }

  function messageNode(message) {
    const node = el("article", "message " + message.role);
    const label = message.role === "user" ? "You" : "Assistant";
    node.setAttribute("aria-label", label);
    const head = el("div", "role", label);
    if (message.role === "assistant" && message.model) head.appendChild(el("span", "model-name", message.model));
    node.append(head, el("div", "body"));
    fill(node, message);
    return node;
  }

  function fill(node, message) {
    const body = node.querySelector(".body");
    if (message.role === "user") {
      body.replaceChildren(el("div", "user-text", message.content));
      return;
    }
    const { reasoning, text } = parts(message);
    const wasOpen = body.querySelector("details.reasoning")?.open || false;
    const children = [];
    if (reasoning) {
      const details = el("details", "reasoning");
      details.open = wasOpen;
      details.appendChild(el("summary", null, message.streaming && !text ? "Reasoning…" : "Reasoning"));
      details.appendChild(el("div", "reasoning-text", reasoning));
      children.push(details);
    }
    const markdown = el("div", "markdown");
    markdown.appendChild(window.llmMarkdown.render(text));
    children.push(markdown);
    if (message.streaming && !text && !reasoning) {
      const typing = el("div", "typing", "…");
      typing.setAttribute("aria-label", "Waiting for the answer");
      children.push(typing);
    }
    if (message.stopped) children.push(el("div", "notice", "Stopped."));
    if (message.error) children.push(el("div", "message-error", message.error));
    if (message.stats) children.push(el("div", "stats", statsText(message.stats)));
    body.replaceChildren(...children);
    node.setAttribute("aria-busy", message.streaming ? "true" : "false");
  }

  function renderMessages() {
    const nodes = (current ? current.messages : []).map(messageNode);
    ui.empty.hidden = nodes.length > 0;
    ui.messages.replaceChildren(ui.empty, ...nodes);
    scrollToEnd(true);
  }

  function scrollToEnd(force) {
    const box = ui.messages;
    if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }

  // -- sending and streaming ------------------------------------------------------------------

  function wireMessages(messages) {
    const out = [];
    const system = $("system").value.trim();
    if (system) out.push({ role: "system", content: system });
    for (const m of messages) {
      const content = m.role === "assistant" ? parts(m).text : m.content;
      if (content) out.push({ role: m.role, content });
    }
    return out;
  }

  // The SSE events of a response body, each one's data passed to onData; ends at [DONE].
  async function readEvents(res, onData) {
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = /\r?\n\r?\n/.exec(buffer))) {
        const block = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") {
          reader.cancel();
          return;
        }
        onData(JSON.parse(data));
      }
    }
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.picker.disabled = busy || ui.picker.options.length === 0;
    ui.newChat.disabled = busy;
  }

  async function send(text) {
    if (controller || !text.trim()) return;
    hideError();
    if (!current) current = newConversation();
    if (!conversations.includes(current)) conversations.push(current);
    const model = ui.picker.value || undefined;
    current.model = model;
    if (!current.title) current.title = text.trim().split("\n")[0].slice(0, 60);
    const question = { role: "user", content: text };
    const answer = { role: "assistant", content: "", reasoning: "", model, streaming: true };
    const history = wireMessages([...current.messages, question]);
    current.messages.push(question, answer);
    current.updated = Date.now();
    ui.prompt.value = "";
    resizePrompt();
    renderMessages();
    renderList();
    const node = ui.messages.lastElementChild;

    const body = { messages: history, stream: true, stream_options: { include_usage: true },
                   ...samplerFields() };
    if (model) body.model = model;
    const conversation = current;
    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    let firstAt = null;
    let timings = null;
    let usage = null;
    let pending = false;
    const redraw = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        fill(node, answer);
        scrollToEnd(false);
      });
    };
    try {
      const res = await api("/v1/chat/completions", { body, signal: controller.signal });
      await readEvents(res, (chunk) => {
        if (chunk.error) throw new ApiError(500, chunk.error.message || "the stream failed");
        const choice = chunk.choices && chunk.choices[0];
        const delta = (choice && choice.delta) || {};
        if (delta.content || delta.reasoning_content) {
          if (firstAt === null) firstAt = performance.now();
          answer.content += delta.content || "";
          answer.reasoning += delta.reasoning_content || "";
          redraw();
        }
        if (choice && choice.finish_reason) answer.finish = choice.finish_reason;
        if (chunk.timings) timings = chunk.timings;
        if (chunk.usage) usage = chunk.usage;
      });
    } catch (e) {
      if (e.name === "AbortError") {
        answer.stopped = true;
      } else if (!answer.content && !answer.reasoning) {
        // nothing came back: take the question back into the box to send again
        conversation.messages.splice(conversation.messages.indexOf(question), 2);
        if (!conversation.messages.length) conversations = conversations.filter((c) => c !== conversation);
        if (!ui.prompt.value) ui.prompt.value = text;
        resizePrompt();
        handle(e);
      } else {
        answer.error = describe(e);
      }
    } finally {
      controller = null;
      setBusy(false);
      answer.streaming = false;
      if (conversation.messages.includes(answer)) {
        answer.stats = stats(answer, timings, usage, started, firstAt);
      }
      saveConversations();
      if (conversation === current) renderMessages();
      renderList();
      // the streamed text itself is not read out token by token (aria-busy): say when it is done
      ui.announce.textContent = answer.stopped ? "Answer stopped." : answer.error ? answer.error
        : conversation.messages.includes(answer) ? "Answer finished." : "";
      ui.prompt.focus();
    }
  }

  // From the stream's last chunks: usage (stream_options.include_usage) and llama-server's
  // timings; a stopped answer has neither.
  function stats(answer, timings, usage, started, firstAt) {
    const out = { finish: answer.finish };
    if (usage) {
      out.tokens = usage.completion_tokens;
      out.cached = (usage.prompt_tokens_details || {}).cached_tokens;
    }
    if (timings) out.tps = timings.predicted_per_second;
    if (firstAt !== null) out.ttft = (firstAt - started) / 1000;
    return out;
  }

  function stop() {
    if (controller) controller.abort();
  }

  function resizePrompt() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 240) + "px";
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send(ui.prompt.value);
  });
  ui.stop.addEventListener("click", () => {
    stop();
    ui.prompt.focus();
  });
  ui.prompt.addEventListener("input", resizePrompt);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send(ui.prompt.value);
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    if (controller) stop();
    else if (!ui.settings.hidden) closeSettings();
    else closeSidebar();
  });
  ui.errorClose.addEventListener("click", hideError);

  // -- start ----------------------------------------------------------------------------------

  readSettings();
  setKey(apiKey);
  current = newConversation();
  renderList();
  renderMessages();
  loadModels();
  ui.prompt.focus();
})();
