// The page: asks for the API key when the server wants one (kept in sessionStorage, this tab
// only), then shows the chat and the status view. All data comes through the API.
import { ApiError, getJSON, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { StatusView } from "./status.js";

const $ = (id) => document.getElementById(id);

function showModel(status) {
  $("model-badge").textContent = `${status.model.name}${status.model.demo ? " (demo)" : ""} · ${status.state}`;
}

const statusView = new StatusView(showModel);

function select(view) {
  const chat = view === "chat";
  $("chat-view").hidden = !chat;
  $("status-view").hidden = chat;
  $("tab-chat").setAttribute("aria-pressed", String(chat));
  $("tab-status").setAttribute("aria-pressed", String(!chat));
  if (chat) statusView.stop();
  else statusView.start();
  history.replaceState(null, "", chat ? "#chat" : "#status");
}

function askForKey(message) {
  $("key-view").hidden = false;
  $("chat-view").hidden = true;
  $("status-view").hidden = true;
  $("tabs").hidden = true;
  $("key-error").textContent = message;
  $("key-input").focus();
}

let chat = null;

async function start() {
  let status;
  try {
    status = await getJSON("/v1/status");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setApiKey(null);
      askForKey(error.message.startsWith("invalid") ? "That key was refused." : "");
    } else {
      $("key-error").textContent = error.message;
      $("key-view").hidden = false;
    }
    return;
  }
  $("key-view").hidden = true;
  $("tabs").hidden = false;
  showModel(status);
  chat ??= new Chat();
  select(location.hash === "#status" ? "status" : "chat");
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("key-input").value.trim());
  $("key-input").value = "";
  start();
});
$("tab-chat").addEventListener("click", () => select("chat"));
$("tab-status").addEventListener("click", () => select("status"));
start();
