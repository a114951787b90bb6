// Model output as DOM nodes built with textContent: Markdown's paragraphs, headings, lists,
// code blocks and inline code, bold and italics. Nothing is ever parsed as HTML, so a
// <script> or <img onerror> in an answer is shown as the text it is.

const INLINE = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/;

function inline(parent, text) {
  for (const part of text.split(INLINE)) {
    if (!part) continue;
    let node;
    if (part.startsWith("`") && part.endsWith("`") && part.length > 2) {
      node = document.createElement("code");
      node.textContent = part.slice(1, -1);
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 4) {
      node = document.createElement("strong");
      node.textContent = part.slice(2, -2);
    } else if (part.startsWith("*") && part.endsWith("*") && part.length > 2) {
      node = document.createElement("em");
      node.textContent = part.slice(1, -1);
    } else {
      node = document.createTextNode(part);
    }
    parent.append(node);
  }
}

function block(lines) {
  const first = lines[0];
  const heading = /^(#{1,6})\s+(.*)$/.exec(first);
  if (heading && lines.length === 1) {
    const node = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
    inline(node, heading[2]);
    return node;
  }
  const bullet = /^\s*(?:[-*+]|\d+[.)])\s+/;
  if (lines.every((line) => bullet.test(line))) {
    const list = document.createElement(/^\s*\d/.test(first) ? "ol" : "ul");
    for (const line of lines) {
      const item = document.createElement("li");
      inline(item, line.replace(bullet, ""));
      list.append(item);
    }
    return list;
  }
  const paragraph = document.createElement("p");
  lines.forEach((line, i) => {
    if (i) paragraph.append(document.createElement("br"));
    inline(paragraph, line);
  });
  return paragraph;
}

// Replaces the children of `target` with `text` rendered.
export function renderMarkdown(target, text) {
  const nodes = [];
  const parts = text.split(/^```/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const language = newline < 0 ? "" : part.slice(0, newline).trim();
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = newline < 0 ? "" : part.slice(newline + 1).replace(/\n$/, "");
      if (language) pre.dataset.language = language;
      pre.append(code);
      nodes.push(pre);
      return;
    }
    for (const chunk of part.split(/\n\s*\n/)) {
      const lines = chunk.split("\n").filter((line) => line.trim());
      if (lines.length) nodes.push(block(lines));
    }
  });
  target.replaceChildren(...nodes);
}
