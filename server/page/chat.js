// The chat: conversations kept in this browser (localStorage, never on the server), answers
// streamed from /v1/chat/completions, with each answer's figures.
import { streamChat } from "./api.js";
import { renderMarkdown } from "./render.js";

const STORE = "mlx-mistral.conversations";
const SETTINGS = "mlx-mistral.settings";
const $ = (id) => document.getElementById(id);

function load(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function figures(stats) {
  const parts = [];
  if (stats.ttft !== undefined) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
  if (stats.tokensPerSecond !== undefined) parts.push(`${stats.tokensPerSecond.toFixed(1)} tokens/s`);
  if (stats.promptTokens !== undefined) parts.push(`prompt ${stats.promptTokens} tokens (${stats.cachedTokens ?? 0} cached)`);
  if (stats.completionTokens !== undefined) parts.push(`${stats.completionTokens} generated`);
  if (stats.finishReason) parts.push(`finish: ${stats.finishReason}`);
  return parts.join(" · ");
}

export class Chat {
  constructor() {
    this.state = load(STORE, { current: null, conversations: [] });
    this.controller = null;
    const settings = load(SETTINGS, {});
    for (const [id, key] of [["system-prompt", "system"], ["temperature", "temperature"], ["max-tokens", "maxTokens"], ["top-p", "topP"]]) {
      if (settings[key] !== undefined) $(id).value = settings[key];
      $(id).addEventListener("change", () => this.saveSettings());
    }
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") this.stop();
    });
    $("stop").addEventListener("click", () => this.stop());
    $("new-chat").addEventListener("click", () => this.newChat());
    $("delete-chat").addEventListener("click", () => this.deleteChat());
    $("conversation-select").addEventListener("change", (event) => {
      this.state.current = event.target.value;
      this.save();
      this.render();
    });
    if (!this.current()) this.newChat();
    else this.render();
  }

  current() {
    return this.state.conversations.find((c) => c.id === this.state.current);
  }

  save() {
    localStorage.setItem(STORE, JSON.stringify(this.state));
  }

  saveSettings() {
    localStorage.setItem(SETTINGS, JSON.stringify({
      system: $("system-prompt").value,
      temperature: $("temperature").value,
      maxTokens: $("max-tokens").value,
      topP: $("top-p").value,
    }));
  }

  newChat() {
    if (this.controller) return;
    const empty = this.state.conversations.find((c) => c.messages.length === 0);
    const conversation = empty ?? { id: crypto.randomUUID(), title: "New chat", messages: [] };
    if (!empty) this.state.conversations.unshift(conversation);
    this.state.current = conversation.id;
    this.save();
    this.render();
    $("prompt").focus();
  }

  deleteChat() {
    if (this.controller) return;
    this.state.conversations = this.state.conversations.filter((c) => c.id !== this.state.current);
    this.state.current = null;
    this.newChat();
  }

  render() {
    const select = $("conversation-select");
    select.replaceChildren(...this.state.conversations.map((c) => {
      const option = element("option", "", c.title);
      option.value = c.id;
      option.selected = c.id === this.state.current;
      return option;
    }));
    const messages = this.current()?.messages ?? [];
    $("messages").replaceChildren(...messages.map((m, i) => this.messageNode(m, i === messages.length - 1)));
  }

  messageNode(message, last) {
    const item = element("li", `message ${message.role}`);
    item.append(element("div", "role", message.role === "user" ? "You" : "Model"));
    const body = element("div", "content");
    renderMarkdown(body, message.content);
    item.append(body);
    if (message.stats) item.append(element("div", "figures", figures(message.stats)));
    if (last && !this.controller) {
      const actions = element("div", "actions");
      const label = message.role === "user" ? "Edit" : "Regenerate";
      const button = element("button", "", label);
      button.type = "button";
      button.addEventListener("click", () => (message.role === "user" ? this.edit() : this.regenerate()));
      actions.append(button);
      item.append(actions);
    }
    return item;
  }

  edit() {
    const conversation = this.current();
    const message = conversation.messages.pop();
    this.save();
    this.render();
    $("prompt").value = message.content;
    $("prompt").focus();
  }

  regenerate() {
    const conversation = this.current();
    conversation.messages.pop();
    this.generate(conversation);
  }

  send() {
    const text = $("prompt").value;
    if (!text.trim() || this.controller) return;
    const conversation = this.current();
    if (conversation.messages.length === 0) conversation.title = text.trim().slice(0, 40);
    conversation.messages.push({ role: "user", content: text });
    $("prompt").value = "";
    this.generate(conversation);
  }

  stop() {
    this.controller?.abort();
  }

  request(conversation) {
    const system = $("system-prompt").value.trim();
    const messages = conversation.messages
      .filter((m) => m.content)
      .map(({ role, content }) => ({ role, content }));
    const body = { messages: system ? [{ role: "system", content: system }, ...messages] : messages };
    const number = (id) => Number.parseFloat($(id).value);
    if (Number.isFinite(number("temperature"))) body.temperature = number("temperature");
    if (Number.isFinite(number("top-p"))) body.top_p = number("top-p");
    if (Number.isFinite(number("max-tokens"))) body.max_tokens = Math.round(number("max-tokens"));
    return body;
  }

  async generate(conversation) {
    $("chat-error").textContent = "";
    const answer = { role: "assistant", content: "", stats: {} };
    this.controller = new AbortController();
    this.setBusy(true);
    this.save();
    this.render();
    const node = this.messageNode(answer, false);
    node.setAttribute("aria-busy", "true");
    $("messages").append(node);
    const content = node.querySelector(".content");
    const started = performance.now();
    let first = null;
    try {
      for await (const chunk of streamChat(this.request(conversation), this.controller.signal)) {
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          first ??= performance.now();
          answer.content += choice.delta.content;
          content.textContent = answer.content; // Markdown once the answer is complete
        }
        if (choice?.finish_reason) answer.stats.finishReason = choice.finish_reason;
        if (chunk.usage) {
          answer.stats.promptTokens = chunk.usage.prompt_tokens;
          answer.stats.cachedTokens = chunk.usage.prompt_tokens_details?.cached_tokens ?? 0;
          answer.stats.completionTokens = chunk.usage.completion_tokens;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") answer.stats.finishReason = "stopped";
      else $("chat-error").textContent = error.message;
    }
    const ended = performance.now();
    if (first !== null) {
      answer.stats.ttft = (first - started) / 1000;
      const tokens = answer.stats.completionTokens ?? 0;
      if (tokens > 1 && ended > first) answer.stats.tokensPerSecond = (tokens - 1) / ((ended - first) / 1000);
    }
    if (answer.content || answer.stats.finishReason) conversation.messages.push(answer);
    this.controller = null;
    this.setBusy(false);
    this.save();
    this.render();
  }

  setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }
}
