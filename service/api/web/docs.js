// Starts Swagger UI on /docs (service/api/api_docs.py): a served script, as the CSP allows no inline one.
// The options are FastAPI's own for its /docs page; the validator badge is off (it would load an image
// from the internet) and nothing else is fetched but /openapi.json from this server.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
});
