"use strict";
// GraphiQL on this service's own origin. The bearer token goes in the Headers tab:
// {"Authorization": "Bearer <token>"} (`make token HEADERS=1` prints it); the headers are
// kept for this browser tab only. Each example operation opens in its own tab.
(function () {
  const examples = JSON.parse(document.getElementById("examples-data").textContent);
  const http = GraphiQL.createFetcher({ url: window.location.pathname });
  // GraphiQL keeps headers per tab: the last Authorization typed in any tab serves the tabs
  // (and the schema fetch) that still hold the placeholder, for this browser tab only.
  const KEY = "credits.graphiql.authorization";
  const fetcher = (params, opts) => {
    const headers = { ...((opts && opts.headers) || {}) };
    const given = headers.Authorization || headers.authorization;
    if (given && !given.includes("<token>")) {
      sessionStorage.setItem(KEY, given);
    } else if (sessionStorage.getItem(KEY)) {
      delete headers.authorization;
      headers.Authorization = sessionStorage.getItem(KEY);
    }
    // Just after a tab switch GraphiQL may still send the previous tab's operation name.
    const name = params.operationName;
    const named = name && new RegExp(`\\b(query|mutation|subscription)\\s+${name}\\b`);
    const sent = named && !named.test(params.query) ? { ...params, operationName: null } : params;
    return http(sent, { ...(opts || {}), headers });
  };
  // Named operations, so each tab shows its example's name.
  const tabs = Object.entries(examples).map(([name, query]) => ({
    query: query.startsWith("{") ? `query ${name.replace(/\W/g, "")} ${query}` : query,
  }));
  const root = ReactDOM.createRoot(document.getElementById("graphiql"));
  root.render(
    React.createElement(GraphiQL, {
      fetcher,
      defaultTabs: tabs,
      defaultHeaders: '{"Authorization": "Bearer <token>"}',
      defaultEditorToolsVisibility: "headers",
      shouldPersistHeaders: false,
      isHeadersEditorEnabled: true,
    }, React.createElement(GraphiQL.Logo, {}, "Purchase Credits · GraphiQL")),
  );
  document.body.dataset.ready = "true";
})();
