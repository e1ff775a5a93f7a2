// Starts the browser app. A file rather than an inline script: the Content-Security-Policy the server sends
// allows only the app's own scripts (backend/src/http.rs).
import init from "/pkg/replichat_frontend.js";

init();
