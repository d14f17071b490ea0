// The chat page: sends a conversation to POST /message and streams the reply in; conversations are kept
// in this browser (history.js).

import { SSEParser } from "./sse.js";
import { copyButton, renderMarkdown } from "./markdown.js";
import { History } from "./history.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "proxy-key";            // sessionStorage: the client key, for this tab's session only
const MODEL_STORAGE = "proxy-chat-model";   // localStorage: the last model chosen
const THEME_STORAGE = "proxy-chat-theme";   // localStorage: "light" or "dark"; none: the system's
const state = { controller: null, editing: null, config: { model: "", models: [], auth_required: false } };
const history = new History(() => { $("storage-note").hidden = false; });
let current = history.create(); // the conversation on screen; listed once it has a message

start();

async function start() {
  applyTheme(recall(THEME_STORAGE));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", onInputKey);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) state.controller.abort();
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("skip").addEventListener("click", (event) => {
    event.preventDefault();
    $("input").focus();
  });
  $("conversations").addEventListener("keydown", onListKey);
  $("history-toggle").addEventListener("click", () => showHistory($("history-toggle").ariaExpanded !== "true"));
  $("theme").addEventListener("click", toggleTheme);
  $("forget-key").addEventListener("click", forgetKey);
  $("system").addEventListener("input", () => { current.system = $("system").value; saveIfListed(); });
  $("key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("key").value));
  listConversations();
  if (history.conversations.length) openConversation(history.conversations[0].id);
  try {
    const response = await fetch("/ui/config.json");
    if (response.ok) state.config = await response.json();
  } catch {
    // The defaults above still work against a proxy without client keys.
  }
  $("key-field").hidden = !state.config.auth_required;
  $("input").focus();
  await showModels();
}

function onInputKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape" && state.editing !== null && !state.controller) {
    stopEditing();
  }
}

// The model picker: the proxy's allowed models; else a free-text field, which becomes a list once
// /v1/models has answered with one. The last choice is remembered.
async function showModels() {
  const remembered = recall(MODEL_STORAGE);
  $("model-select").addEventListener("change", () => remember(MODEL_STORAGE, chosenModel()));
  $("model").addEventListener("change", () => remember(MODEL_STORAGE, chosenModel()));
  let models = state.config.models;
  if (!models.length) {
    $("model").placeholder = state.config.model;
    $("model").value = remembered || "";
    $("model-field").hidden = false;
    models = await listedModels();
  }
  if (models.length) {
    const chosen = models.includes(remembered) ? remembered : state.config.model;
    $("model-select").replaceChildren(...models.map((name) => new Option(name, name, name === chosen,
                                                                       name === chosen)));
    $("model-choice").hidden = false;
    $("model-field").hidden = true;
  }
}

function recall(name) {
  try {
    return localStorage.getItem(name);
  } catch {
    return null;
  }
}

function remember(name, value) {
  try {
    localStorage.setItem(name, value);
  } catch {
    // Not kept: storage is full or disabled.
  }
}

async function listedModels() {
  try {
    const response = await fetch("/v1/models", { headers: requestHeaders(), signal: AbortSignal.timeout(5000) });
    const list = response.ok ? (await response.json()).data : [];
    return Array.isArray(list) ? list.map((model) => model?.id).filter((id) => typeof id === "string") : [];
  } catch {
    return [];
  }
}

function chosenModel() {
  if (!$("model-choice").hidden) return $("model-select").value;
  if (!$("model-field").hidden) return $("model").value.trim();
  return "";
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  if (state.editing !== null) { // what follows the edited message is replaced
    current.messages.splice(state.editing);
    stopEditing();
  }
  $("input").value = "";
  current.messages.push({ role: "user", content: text });
  history.touch(current);
  await ask(current);
}

// Regenerate the last reply: it is dropped, and the conversation is sent again as it was before it.
async function retry() {
  if (state.controller) return;
  while (current.messages.length && current.messages.at(-1).role === "assistant") current.messages.pop();
  if (current.messages.length) await ask(current);
}

function editMessage(index) {
  if (state.controller) return;
  state.editing = index;
  $("input").value = current.messages[index].content;
  $("editing").hidden = false;
  $("input").focus();
}

function stopEditing() {
  state.editing = null;
  $("editing").hidden = true;
}

async function ask(conversation) {
  showConversation();
  listConversations();
  const reply = addMessage("assistant");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const run = { started: performance.now(), firstToken: null, content: "", frames: 0, usage: null, ended: false };
  try {
    const response = await fetch("/message", {
      method: "POST", headers: requestHeaders(), body: JSON.stringify(requestBody(conversation)),
      signal: controller.signal,
    });
    if (!response.ok) {
      showError(reply, await httpErrorText(response));
    } else {
      await readStream(response, reply, run);
      if (!run.ended) showError(reply, "The connection ended before the reply was finished.");
    }
  } catch (error) {
    if (error.name === "AbortError") {
      showNote(reply, "Stopped.");
      run.stopped = true;
    } else {
      showError(reply, `Lost the connection to the proxy (${error.message}).`);
    }
  } finally {
    if (run.firstToken !== null) showStats(reply, run);
    keepReply(conversation, reply, run);
    state.controller = null;
    setBusy(false);
    if (conversation === current) showConversation();
    $("input").focus();
  }
}

// What a reply leaves in its conversation: its text (a stopped one's part of it), and what the page
// showed under it, so that a reload shows the same.
function keepReply(conversation, reply, run) {
  const message = { role: "assistant", content: run.content };
  if (run.stopped) message.stopped = true;
  const error = reply.body.querySelector(".error");
  if (error) message.error = error.textContent;
  if (reply.meta.textContent) message.meta = reply.meta.textContent;
  conversation.messages.push(message);
  history.touch(conversation);
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (state.config.auth_required && key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function requestBody(conversation) {
  const messages = conversation.messages.filter((message) => message.content)
    .map(({ role, content }) => ({ role, content }));
  if (conversation.system?.trim()) messages.unshift({ role: "system", content: conversation.system.trim() });
  const body = { messages };
  const model = chosenModel();
  if (model) body.model = model;
  return body;
}

async function readStream(response, reply, run) {
  const parser = new SSEParser();
  const decoder = new TextDecoder();
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    const events = done ? [...parser.feed(decoder.decode()), ...parser.end()]
      : parser.feed(decoder.decode(value, { stream: true }));
    for (const event of events) takeEvent(event, reply, run);
    if (done) return;
  }
}

function takeEvent(event, reply, run) {
  const data = JSON.parse(event.data);
  if (event.event === "message" && data.content) {
    run.firstToken ??= performance.now();
    run.content += data.content;
    run.frames += 1;
    reply.body.replaceChildren(renderMarkdown(run.content));
    scrollToEnd();
  } else if (event.event === "done") {
    run.usage = data.usage;
    run.ended = true;
  } else if (event.event === "error") {
    showError(reply, data.error?.message || "The upstream reported an error.");
    run.ended = true;
  }
}

async function httpErrorText(response) {
  let message = response.statusText;
  let code;
  try {
    const error = (await response.json()).error;
    message = error?.message || message;
    code = error?.code;
  } catch {
    // Not JSON: keep the status text.
  }
  if (response.status === 401) {
    $("key-field").hidden = false;
    // The proxy's words are for API clients (headers, SDKs); on this page the key goes in the Key field.
    if (code === "invalid_api_key") {
      message = $("key").value.trim()
        ? "The key in the Key field was not accepted. Check it: it must be one of this proxy's client keys."
        : "This proxy needs a client key: enter yours in the Key field above.";
    }
  }
  const wait = Number(response.headers.get("Retry-After"));
  const later = response.status === 429 && wait > 0 ? ` Try again in ${waitText(wait)}.` : "";
  return `Error ${response.status}: ${message}${later}`;
}

function waitText(seconds) {
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

function addMessage(role) {
  $("empty")?.remove();
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("p");
  meta.className = "meta";
  if (role === "assistant") {
    body.setAttribute("aria-live", "polite");
    body.setAttribute("aria-busy", "true");
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  article.append(who, body, meta, actions);
  $("conversation").append(article);
  scrollToEnd();
  return { article, body, meta, actions };
}

function showError(reply, text) {
  const error = document.createElement("p");
  error.className = "error";
  error.setAttribute("role", "alert");
  error.textContent = text;
  reply.body.append(error);
}

function showNote(reply, text) {
  const note = document.createElement("p");
  note.className = "note";
  note.textContent = text;
  reply.body.append(note);
}

function showStats(reply, run) {
  const seconds = (performance.now() - run.firstToken) / 1000;
  const tokens = run.usage?.completion_tokens ?? run.frames;
  const rate = seconds > 0 ? `${(tokens / seconds).toFixed(1)} tokens/s` : "";
  const ttft = `first token ${((run.firstToken - run.started) / 1000).toFixed(2)} s`;
  const usage = run.usage ? `${run.usage.prompt_tokens} in, ${run.usage.completion_tokens} out` : "";
  reply.meta.textContent = [ttft, rate, usage].filter(Boolean).join(" · ");
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (busy) $("stop").focus();
}

function newChat() {
  state.controller?.abort();
  stopEditing();
  current = history.create();
  showConversation();
  listConversations();
  showHistory(false);
  $("input").focus();
}

function openConversation(id) {
  const conversation = history.get(id);
  if (!conversation) return;
  state.controller?.abort();
  stopEditing();
  current = conversation;
  showConversation();
  listConversations();
  showHistory(false);
  $("input").focus();
}

// The conversation on screen, drawn again from what was kept of it, each message with its actions.
function showConversation() {
  $("system").value = current.system || "";
  $("system-prompt").open = Boolean(current.system);
  if (!current.messages.length) {
    const hint = document.createElement("p");
    hint.id = "empty";
    hint.className = "hint";
    hint.textContent = "Send a message to start. The reply streams in token by token.";
    $("conversation").replaceChildren(hint);
    return;
  }
  $("conversation").replaceChildren();
  current.messages.forEach((message, index) => {
    const view = addMessage(message.role);
    view.body.removeAttribute("aria-busy");
    view.body.append(renderMarkdown(message.content));
    if (message.stopped) showNote(view, "Stopped.");
    if (message.error) showError(view, message.error);
    if (message.meta) view.meta.textContent = message.meta;
    if (message.role === "user") view.actions.append(button("Edit", "quiet small", () => editMessage(index)));
    if (message.role === "assistant" && message.content) {
      view.actions.append(copyButton(message.content, "Copy the reply", "quiet small"));
    }
    if (message.role === "assistant" && index === current.messages.length - 1) {
      view.actions.append(button("Retry", "quiet small", retry));
    }
  });
}

// The side list: each conversation, newest first, with rename and delete. The list is one stop for Tab
// (the current conversation, else the first); the arrow keys move between conversations, so that a long
// list never stands between the top of the page and the message box.
function listConversations() {
  const stop = history.get(current.id) ? current.id : history.conversations[0]?.id;
  const items = history.conversations.map((conversation) => {
    const item = document.createElement("li");
    if (conversation.id === current.id) item.setAttribute("aria-current", "true");
    const open = button(conversation.title, "open", () => openConversation(conversation.id));
    open.tabIndex = conversation.id === stop ? 0 : -1;
    const rename = button("Rename", "quiet small", () => renameConversation(item, conversation));
    rename.setAttribute("aria-label", `Rename “${conversation.title}”`);
    const remove = button("Delete", "quiet small", () => deleteConversation(conversation.id));
    remove.setAttribute("aria-label", `Delete “${conversation.title}”`);
    item.append(open, rename, remove);
    return item;
  });
  $("conversations").replaceChildren(...items);
}

function onListKey(event) {
  const opens = [...$("conversations").querySelectorAll(".open")];
  const at = opens.indexOf(event.target);
  const step = { ArrowDown: 1, ArrowUp: -1 }[event.key];
  if (at < 0 || !step) return;
  event.preventDefault();
  const next = opens[Math.min(opens.length - 1, Math.max(0, at + step))];
  opens.forEach((open) => { open.tabIndex = open === next ? 0 : -1; });
  next.focus();
}

function renameConversation(item, conversation) {
  const field = document.createElement("input");
  field.value = conversation.title;
  field.setAttribute("aria-label", "New name");
  let finished = false;
  const done = (keep) => {
    if (finished) return;
    finished = true;
    if (keep) history.rename(conversation.id, field.value);
    listConversations();
  };
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter") done(true);
    if (event.key === "Escape") done(false);
  });
  field.addEventListener("blur", () => done(true));
  item.replaceChildren(field);
  field.focus();
  field.select();
}

function deleteConversation(id) {
  history.remove(id);
  if (id === current.id) {
    state.controller?.abort();
    current = history.create();
    showConversation();
  }
  listConversations();
}

function saveIfListed() {
  if (history.get(current.id)) history.save();
}

function showHistory(open) {
  $("history-toggle").setAttribute("aria-expanded", String(open));
  document.body.classList.toggle("history-open", open);
}

function applyTheme(theme) {
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  const dark = theme ? theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  $("theme").textContent = dark ? "Light" : "Dark";
  $("theme").setAttribute("aria-label", dark ? "Switch to the light theme" : "Switch to the dark theme");
}

function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  const theme = dark ? "light" : "dark";
  remember(THEME_STORAGE, theme);
  applyTheme(theme);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("key").value = "";
  $("key").focus();
}

function button(text, className, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = className;
  node.textContent = text;
  node.addEventListener("click", onClick);
  return node;
}

function scrollToEnd() {
  $("conversation").lastElementChild?.scrollIntoView({ block: "end" });
}
