// The page's only way in: the public GraphQL API (and the CSV report), with the platform's
// bearer token from session storage.

import { OPERATIONS } from "./operations.js";

const TOKEN_KEY = "purchase-credits.token";

export class SignInNeeded extends Error {}

/** Move a token from the URL fragment (#token=...) into session storage; drop the fragment. */
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** A network failure (no answer at all): the same request may be sent again. */
export class NetworkError extends Error {}

/** Run one of the page's operations (operations.graphql) by its name: the page sends its
 * trusted document's id (sha256), never the text (api/trusted.py). */
export async function gql(operationName, variables = {}) {
  const sha256Hash = OPERATIONS[operationName];
  if (!sha256Hash) throw new Error(`Unknown operation ${operationName}.`);
  const t = token();
  if (!t) throw new SignInNeeded("You are not signed in.");
  let response;
  try {
    response = await fetch("/graphql", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${t}` },
      body: JSON.stringify({
        operationName, variables, extensions: { persistedQuery: { version: 1, sha256Hash } },
      }),
    });
  } catch (err) {
    throw new NetworkError(`The service could not be reached (${err.message}).`);
  }
  if (response.status === 401) throw new SignInNeeded("Your session has expired.");
  if (!response.ok && response.status >= 500) {
    throw new NetworkError(`The service answered ${response.status}.`);
  }
  const body = await response.json();
  if (body.errors?.length) {
    const err = new Error(body.errors.map((e) => e.message).join("; "));
    err.code = body.errors[0].extensions?.code;
    throw err;
  }
  return body.data;
}

/** Download the CSV report with the token in the header (a plain link would get 401). */
export async function downloadCsv(params, filename) {
  const response = await fetch(`/reports/transactions.csv?${params}`, {
    headers: { Authorization: `Bearer ${token()}` },
  });
  if (response.status === 401) throw new SignInNeeded("Your session has expired.");
  if (!response.ok) throw new Error(`The report could not be made (${response.status}).`);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** creditBalanceChanged over graphql-transport-ws; reconnects with a growing pause. */
export function liveBalance({ onBalance, onState, onExpired }) {
  let socket;
  let pause = 1000;
  let stopped = false;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/graphql`;
  const connect = () => {
    if (stopped) return;
    socket = new WebSocket(url, "graphql-transport-ws");
    socket.onopen = () => {
      socket.send(JSON.stringify({
        type: "connection_init",
        payload: { authorization: `Bearer ${token()}` },
      }));
    };
    socket.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "connection_ack") {
        pause = 1000;
        onState("live");
        socket.send(JSON.stringify({
          id: "balance",
          type: "subscribe",
          payload: { query: "subscription { creditBalanceChanged { balance transaction { id type credits } } }" },
        }));
      } else if (msg.type === "next") {
        const change = msg.payload?.data?.creditBalanceChanged;
        if (change) onBalance(change);
      } else if (msg.type === "error") {
        const code = msg.payload?.[0]?.extensions?.code;
        if (code === "UNAUTHENTICATED") { stopped = true; onExpired(); }
      } else if (msg.type === "ping") {
        socket.send(JSON.stringify({ type: "pong" }));
      }
    };
    socket.onclose = (event) => {
      if (event.code === 4403 || event.code === 4401) { stopped = true; onExpired(); return; }
      onState("reconnecting");
      if (!stopped) setTimeout(connect, pause);
      pause = Math.min(pause * 2, 30_000);
    };
  };
  connect();
  return { stop() { stopped = true; socket?.close(); } };
}
