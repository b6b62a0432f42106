// A Server-Sent Events parser (the text/event-stream format): feed it text as it arrives, get whole messages.
// Comments (": keep-alive") are skipped; a message's data lines are joined with "\n" and parsed as JSON.
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.event = "message";
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    const out = [];
    let nl;
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, nl);
      const width = this.buffer.startsWith("\r\n", nl) ? 2 : 1;
      // A lone "\r" at the end may be the first half of "\r\n": wait for more.
      if (width === 1 && this.buffer[nl] === "\r" && nl === this.buffer.length - 1) break;
      this.buffer = this.buffer.slice(nl + width);
      if (line === "") {
        if (this.data.length) {
          const raw = this.data.join("\n");
          let data;
          try { data = JSON.parse(raw); } catch { data = raw; }
          out.push({ event: this.event, data });
        }
        this.event = "message";
        this.data = [];
      } else if (line.startsWith(":")) {
        continue;
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") this.event = value;
        else if (field === "data") this.data.push(value);
      }
    }
    return out;
  }
}
