// The status view: /v1/status every two seconds while shown, and a tokens-per-second chart.
import { getJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
const PERIOD_MS = 2000;

function bytes(n) {
  if (n === null || n === undefined) return "none";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function percent(rate) {
  return rate === null || rate === undefined ? "n/a" : `${(rate * 100).toFixed(1)}%`;
}

function rows(status) {
  const model = status.model;
  const quant = model.quantization ? `${model.quantization.bits}-bit weights` : "full-precision weights";
  const memory = status.memory;
  const requests = status.requests;
  return [
    ["Model", `${model.name}${model.demo ? " (the bundled demo model, not Mistral-7B)" : ""}`],
    ["Weights", `${quant}${model.kv_bits ? `, ${model.kv_bits}-bit KV cache` : ""}`],
    ["Context window", model.context_length ? `${model.context_length} tokens` : "unknown until loaded"],
    ["State", status.state + (status.unloads_at ? `, unloads at ${new Date(status.unloads_at).toLocaleTimeString()}` : "")],
    ["Memory", `${bytes(memory.total_bytes)} (weights ${bytes(memory.weights_bytes)}, KV ${bytes(memory.kv_bytes)}, prefix cache ${bytes(memory.prefix_cache_bytes)})`],
    ["Disk prompt cache", status.disk_cache ? `${status.disk_cache.entries} prompts, up to ${bytes(status.disk_cache.limit_bytes)}` : "off"],
    ["Memory budget", memory.limit_bytes ? bytes(memory.limit_bytes) : "no cap (--max-memory)"],
    ["Requests", `${requests.active} active, ${requests.running} decoding, ${requests.waiting} waiting`],
    ["Tokens per second", `${status.tokens_per_second.now} now; ${status.tokens.generated} generated in all`],
    ["Prefix cache hits", `${percent(status.prefix_cache.hit_rate)} of ${status.tokens.prompt} prompt tokens`],
    ["Speculation", `${status.speculation.mode}; ${percent(status.speculation.acceptance_rate)} of ${status.speculation.proposed} drafted tokens accepted`],
    ["Dialects", status.served.dialects.join("; ")],
  ];
}

function clients(status) {
  const urls = status.served.base_urls;
  const key = status.served.api_key_required ? "<your key>" : "none";
  return [
    ["openai (Python)", `OpenAI(base_url="${urls.openai}", api_key="${key}")`],
    ["Claude Code", `ANTHROPIC_BASE_URL=${urls.anthropic} ANTHROPIC_AUTH_TOKEN=${key} claude`],
    ["Codex (~/.codex/config.toml)", `[model_providers.mlx]\nname = "mlx-mistral"\nbase_url = "${urls.openai}"\nwire_api = "responses"`],
    ["Continue, Zed, Open WebUI", `OpenAI-compatible provider, base URL ${urls.openai}, model ${status.model.name}`],
    ["Ollama apps", `${urls.ollama}`],
  ];
}

function drawChart(canvas, counts) {
  // Drawn at the screen's pixel density, in CSS pixels.
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 120;
  if (canvas.width !== Math.round(width * scale)) canvas.width = Math.round(width * scale);
  if (canvas.height !== Math.round(height * scale)) canvas.height = Math.round(height * scale);
  const context = canvas.getContext("2d");
  context.setTransform(scale, 0, 0, scale, 0, 0);
  const style = getComputedStyle(canvas);
  context.clearRect(0, 0, width, height);
  const peak = Math.max(1, ...counts);
  const bar = width / Math.max(1, counts.length);
  context.fillStyle = style.getPropertyValue("--chart").trim() || "#e8590c";
  counts.forEach((count, i) => {
    const h = (count / peak) * (height - 4);
    context.fillRect(i * bar, height - h, Math.max(1, bar - 0.5), h);
  });
  const total = counts.reduce((a, b) => a + b, 0);
  canvas.setAttribute("aria-label", total ? `peak ${peak} tokens/s, ${total} tokens in the last ${counts.length} s` : "no tokens yet");
  canvas.dataset.total = String(total);
}

export class StatusView {
  constructor(onModel) {
    this.onModel = onModel;
    this.timer = null;
  }

  async refresh() {
    try {
      const status = await getJSON("/v1/status");
      $("status-error").textContent = "";
      this.onModel(status);
      this.show(status);
    } catch (error) {
      $("status-error").textContent = `status: ${error.message}`;
    }
  }

  show(status) {
    $("status-list").replaceChildren(...rows(status).flatMap(([name, value]) => {
      const term = document.createElement("dt");
      term.textContent = name;
      const detail = document.createElement("dd");
      detail.textContent = value;
      return [term, detail];
    }));
    $("clients").replaceChildren(...clients(status).map(([name, text]) => {
      const figure = document.createElement("figure");
      const caption = document.createElement("figcaption");
      caption.textContent = name;
      const pre = document.createElement("pre");
      pre.textContent = text;
      figure.append(caption, pre);
      return figure;
    }));
    drawChart($("rate-chart"), status.tokens_per_second.counts);
  }

  start() {
    if (this.timer) return;
    this.refresh();
    this.timer = setInterval(() => this.refresh(), PERIOD_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
