// Server-Sent Events parsing (WHATWG HTML, 9.2.6) for text that arrives in
// arbitrary pieces: a frame, a line, even a CRLF may be split between reads.

const LINE_END = /\r\n|\r|\n/g;

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  // Feed the next piece of text; returns the events it completes, as {event, data}.
  feed(text) {
    this.buffer += text;
    const events = [];
    let start = 0;
    LINE_END.lastIndex = 0;
    for (let match; (match = LINE_END.exec(this.buffer)) !== null;) {
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break; // may be half a CRLF
      this.takeLine(this.buffer.slice(start, match.index), events);
      start = LINE_END.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  // At the end of the stream: a final CR is a whole line end after all.
  end() {
    const events = [];
    if (this.buffer.endsWith("\r")) {
      this.takeLine(this.buffer.slice(0, -1), events);
      this.buffer = "";
    }
    return events;
  }

  takeLine(line, events) {
    if (line === "") {
      if (this.data.length) events.push({ event: this.event || "message", data: this.data.join("\n") });
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment, such as the proxy's ": keep-alive"
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
  }
}
