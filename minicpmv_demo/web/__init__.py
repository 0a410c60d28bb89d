"""The page and the HTTP edge: the Gradio Blocks page, the OpenAI-compatible routes, the guards
in front of them, and `server.build_app`, which assembles model, engine and page. Nothing here
touches the model: handlers hand requests to the engine through `ChatService`."""
