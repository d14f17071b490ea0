// Light markdown for untrusted model output, built as DOM nodes: text only
// ever goes in through text nodes and textContent, never innerHTML.

const FENCE = /^\s*```\s*([\w+.-]*)\s*$/;
const FENCE_END = /^\s*```\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+/;
const ORDERED = /^\s*\d+[.)]\s+/;
const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*|_[^_\s][^_\n]*_)|(\[[^\]\n]+\]\([^)\s]+\))/g;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const TABLE_ROW = /^\s*\|.*\|\s*$/;
const TABLE_RULE = /^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$/;

export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split(/\r\n|\r|\n/);
  for (let i = 0; i < lines.length;) {
    const fence = lines[i].match(FENCE);
    if (fence) {
      const code = [];
      for (i++; i < lines.length && !FENCE_END.test(lines[i]); i++) code.push(lines[i]);
      i++; // the closing fence, or the end of a reply still streaming
      fragment.append(codeBlock(code.join("\n"), fence[1]));
    } else if (HEADING.test(lines[i])) {
      const [, marks, title] = lines[i].match(HEADING);
      const heading = document.createElement(`h${Math.min(6, marks.length + 2)}`); // below the page's own
      appendInline(heading, title);
      fragment.append(heading);
      i++;
    } else if (TABLE_ROW.test(lines[i]) && TABLE_RULE.test(lines[i + 1] || "")) {
      const rows = [lines[i]];
      for (i += 2; i < lines.length && TABLE_ROW.test(lines[i]); i++) rows.push(lines[i]);
      fragment.append(table(rows));
    } else if (LIST_ITEM.test(lines[i])) {
      const ordered = ORDERED.test(lines[i]);
      const list = document.createElement(ordered ? "ol" : "ul");
      for (; i < lines.length && LIST_ITEM.test(lines[i]) && ORDERED.test(lines[i]) === ordered; i++) {
        const item = document.createElement("li");
        appendInline(item, lines[i].replace(LIST_ITEM, ""));
        list.append(item);
      }
      fragment.append(list);
    } else if (!lines[i].trim()) {
      i++;
    } else {
      const paragraph = document.createElement("p");
      for (let first = true; i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) &&
           !LIST_ITEM.test(lines[i]) && !HEADING.test(lines[i]); i++, first = false) {
        if (!first) paragraph.append(document.createElement("br"));
        appendInline(paragraph, lines[i]);
      }
      fragment.append(paragraph);
    }
  }
  return fragment;
}

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    const token = match[0];
    if (match[1]) parent.append(element("code", token.slice(1, -1)));
    else if (match[2]) parent.append(withInline("strong", token.slice(2, -2)));
    else if (match[3]) parent.append(withInline("em", token.slice(1, -1)));
    else parent.append(link(token));
    last = match.index + token.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function element(name, text) {
  const node = document.createElement(name);
  node.textContent = text;
  return node;
}

function withInline(name, text) {
  const node = document.createElement(name);
  appendInline(node, text);
  return node;
}

// Links only to http(s); anything else (javascript:, data:, relative) stays text.
function link(token) {
  const [, label, href] = token.match(/^\[([^\]]+)\]\(([^)\s]+)\)$/);
  let url = null;
  try {
    url = new URL(href);
  } catch {
    url = null;
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) return document.createTextNode(token);
  const anchor = element("a", label);
  anchor.href = url.href;
  anchor.rel = "noopener noreferrer";
  anchor.target = "_blank";
  return anchor;
}

// A table: the first row its header; each cell's text inline-formatted, as a paragraph's.
function table(rows) {
  const node = document.createElement("table");
  rows.forEach((row, index) => {
    const line = document.createElement("tr");
    for (const cell of row.trim().slice(1, -1).split("|")) {
      const part = document.createElement(index === 0 ? "th" : "td");
      appendInline(part, cell.trim());
      line.append(part);
    }
    node.append(line);
  });
  const scroll = document.createElement("div");
  scroll.className = "table";
  scroll.append(node);
  return scroll;
}

// A button that puts text on the clipboard and says, for a moment, whether it did.
export function copyButton(text, label, className) {
  const copy = element("button", "Copy");
  copy.type = "button";
  copy.className = className;
  copy.setAttribute("aria-label", label);
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  return copy;
}

function codeBlock(code, language) {
  const block = document.createElement("div");
  block.className = "code";
  const copy = copyButton(code, "Copy code", "copy");
  const pre = document.createElement("pre");
  const body = element("code", code);
  if (language) body.dataset.language = language;
  pre.append(body);
  block.append(copy, pre);
  if (language) block.prepend(element("span", language));
  return block;
}
