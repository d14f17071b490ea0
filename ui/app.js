// The chat page: sends the conversation to POST /message and streams the reply in.

import { SSEParser } from "./sse.js";
import { renderMarkdown } from "./markdown.js";
import { History } from "./history.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "proxy-key";
const state = { controller: null, config: { model: "", models: [], auth_required: false } };
const history = new History(() => { $("storage-note").hidden = false; });
let current = history.create(); // the conversation on screen; listed once it has a message

start();

async function start() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("history-toggle").addEventListener("click", () => showHistory($("history-toggle").ariaExpanded !== "true"));
  listConversations();
  if (history.conversations.length) openConversation(history.conversations[0].id);
  $("key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("key").value));
  try {
    const response = await fetch("/ui/config.json");
    if (response.ok) state.config = await response.json();
  } catch {
    // The defaults above still work against a proxy without client keys.
  }
  showSettings(state.config);
  $("input").focus();
}

function showSettings({ model, models, auth_required: authRequired }) {
  if (models.length > 1) {
    for (const name of models) $("model-select").append(new Option(name, name, name === model, name === model));
    $("model-choice").hidden = false;
  } else if (models.length === 0) {
    $("model").placeholder = model;
    $("model-field").hidden = false;
  }
  $("key-field").hidden = !authRequired;
}

function chosenModel() {
  if (!$("model-choice").hidden) return $("model-select").value;
  if (!$("model-field").hidden) return $("model").value.trim();
  return "";
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  $("empty")?.remove();
  const conversation = current;
  conversation.messages.push({ role: "user", content: text });
  history.touch(conversation);
  listConversations();
  addMessage("user").body.append(renderMarkdown(text));
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
    reply.body.removeAttribute("aria-busy");
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (state.config.auth_required && key) headers.Authorization = `Bearer ${key}`;
  return headers;
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

function requestBody(conversation) {
  const messages = conversation.messages.filter((message) => message.content)
    .map(({ role, content }) => ({ role, content }));
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
  try {
    message = (await response.json()).error?.message || message;
  } catch {
    // Not JSON: keep the status text.
  }
  if (response.status === 401) $("key-field").hidden = false;
  return `Error ${response.status}: ${message}`;
}

function addMessage(role) {
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
  article.append(who, body, meta);
  $("conversation").append(article);
  scrollToEnd();
  return { article, body, meta };
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
  reply.meta.textContent = [ttft, rate].filter(Boolean).join(" · ");
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (busy) $("stop").focus();
}

function newChat() {
  state.controller?.abort();
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
  current = conversation;
  showConversation();
  listConversations();
  showHistory(false);
}

// The conversation on screen, drawn again from what was kept of it.
function showConversation() {
  if (!current.messages.length) {
    const hint = document.createElement("p");
    hint.id = "empty";
    hint.className = "hint";
    hint.textContent = "Send a message to start. The reply streams in token by token.";
    $("conversation").replaceChildren(hint);
    return;
  }
  $("conversation").replaceChildren();
  for (const message of current.messages) {
    const view = addMessage(message.role);
    view.body.removeAttribute("aria-busy");
    view.body.append(renderMarkdown(message.content));
    if (message.stopped) showNote(view, "Stopped.");
    if (message.error) showError(view, message.error);
    if (message.meta) view.meta.textContent = message.meta;
  }
}

// The side list: each conversation, newest first, with rename and delete.
function listConversations() {
  const items = history.conversations.map((conversation) => {
    const item = document.createElement("li");
    if (conversation.id === current.id) item.setAttribute("aria-current", "true");
    const open = button(conversation.title, "open", () => openConversation(conversation.id));
    const rename = button("Rename", "quiet small", () => renameConversation(item, conversation));
    rename.setAttribute("aria-label", `Rename “${conversation.title}”`);
    const remove = button("Delete", "quiet small", () => deleteConversation(conversation.id));
    remove.setAttribute("aria-label", `Delete “${conversation.title}”`);
    item.append(open, rename, remove);
    return item;
  });
  $("conversations").replaceChildren(...items);
}

function renameConversation(item, conversation) {
  const field = document.createElement("input");
  field.value = conversation.title;
  field.setAttribute("aria-label", "New name");
  const done = (keep) => {
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

function showHistory(open) {
  $("history-toggle").setAttribute("aria-expanded", String(open));
  document.body.classList.toggle("history-open", open);
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
