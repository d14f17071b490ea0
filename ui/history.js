// Conversations kept in this browser (localStorage): a list, newest first, each titled from its first
// message. Where storage is full or disabled, they last as long as the page, and the page says so.

const STORE = "proxy-chat-conversations";
const TITLE_LENGTH = 48;

export class History {
  constructor(onTrouble) {
    this.onTrouble = onTrouble; // called once storage fails: the page shows a note
    this.saving = true;
    this.conversations = this.load();
  }

  load() {
    try {
      const list = JSON.parse(localStorage.getItem(STORE) || "[]");
      return Array.isArray(list) ? list.filter((item) => item && Array.isArray(item.messages)) : [];
    } catch {
      this.fail();
      return [];
    }
  }

  save() {
    if (!this.saving) return;
    try {
      localStorage.setItem(STORE, JSON.stringify(this.conversations));
    } catch {
      this.fail();
    }
  }

  fail() {
    if (!this.saving) return;
    this.saving = false;
    this.onTrouble();
  }

  // A new conversation, first in the list once it has a message.
  create() {
    return { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: "", messages: [],
             updated: Date.now() };
  }

  get(id) {
    return this.conversations.find((item) => item.id === id) || null;
  }

  // The conversation changed (a message, a reply): it moves to the top and is stored.
  touch(conversation) {
    if (!conversation.title) {
      const first = conversation.messages.find((message) => message.role === "user");
      conversation.title = titleOf(first ? first.content : "New chat");
    }
    conversation.updated = Date.now();
    this.conversations = [conversation, ...this.conversations.filter((item) => item.id !== conversation.id)];
    this.save();
  }

  rename(id, title) {
    const conversation = this.get(id);
    if (conversation && title.trim()) {
      conversation.title = titleOf(title);
      this.save();
    }
  }

  remove(id) {
    this.conversations = this.conversations.filter((item) => item.id !== id);
    this.save();
  }
}

function titleOf(text) {
  const line = text.replace(/[*_`#>]+/g, "").replace(/\s+/g, " ").trim();
  return line.length > TITLE_LENGTH ? `${line.slice(0, TITLE_LENGTH - 1)}…` : line || "New chat";
}
