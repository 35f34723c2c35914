package gpudispatch.nacos;

import com.alibaba.nacos.api.common.Constants;
import com.alibaba.nacos.auth.annotation.Secured;
import com.alibaba.nacos.auth.common.ActionTypes;
import com.alibaba.nacos.auth.exception.AccessException;
import com.alibaba.nacos.common.model.RestResult;
import com.alibaba.nacos.common.model.RestResultUtils;
import com.alibaba.nacos.config.server.model.Page;
import com.alibaba.nacos.config.server.model.User;
import com.alibaba.nacos.config.server.utils.RequestUtil;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.web.bind.annotation.DeleteMapping;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PostMapping;
import org.springframework.web.bind.annotation.PutMapping;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RequestParam;
import org.springframework.web.bind.annotation.RestController;

/**
 * Nacos's user API ({@code /nacos/v1/auth/users}, also at {@code /nacos/v1/auth}), as Nacos 2.0.4's
 * console serves it: log in, and (admins) create, list, delete users and set passwords.
 *
 * <pre>
 * POST   /v1/auth/users/login  username, password  → {"accessToken", "tokenTtl", "globalAdmin", "username"}
 *                                                     (403 "unknown user!" when wrong)
 * POST   /v1/auth/users        username, password  → {"code":200,"message":null,"data":"create user ok!"}
 * PUT    /v1/auth/users        username, newPassword  (an admin, or the user itself)
 * DELETE /v1/auth/users        username            (an admin cannot be deleted)
 * GET    /v1/auth/users        pageNo, pageSize    → a page of users (without password hashes)
 * GET    /v1/auth/users/search username            → names of users like it
 * </pre>
 */
@RestController("gpuDispatchUserController")
@RequestMapping({"/v1/auth", "/v1/auth/users"})
public class UserController {

    @Autowired
    private UsersAuthManager authManager;

    @Autowired
    private TokenManager tokens;

    @Autowired
    private UserStore store;

    @PostMapping("/login")
    public Map<String, Object> login(@RequestParam("username") String username, @RequestParam("password") String password,
            HttpServletRequest request, HttpServletResponse response) throws AccessException {
        AuthUser user = (AuthUser) authManager.login(request);
        response.addHeader(UsersAuthManager.AUTHORIZATION_HEADER, UsersAuthManager.TOKEN_PREFIX + user.getToken());
        Map<String, Object> result = new LinkedHashMap<>();
        result.put(Constants.ACCESS_TOKEN, user.getToken());
        result.put(Constants.TOKEN_TTL, tokens.ttlSeconds());
        result.put(Constants.GLOBAL_ADMIN, user.isGlobalAdmin());
        result.put(Constants.USERNAME, user.getUserName());
        return result;
    }

    @PostMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "users", action = ActionTypes.WRITE)
    public RestResult<String> createUser(@RequestParam("username") String username, @RequestParam("password") String password) {
        if (store.findUser(username) != null) {
            throw new IllegalArgumentException("user '" + username + "' already exist!");
        }
        store.createUser(username, password);
        return RestResultUtils.success("create user ok!");
    }

    @DeleteMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "users", action = ActionTypes.WRITE)
    public RestResult<String> deleteUser(@RequestParam("username") String username) {
        if (store.isGlobalAdmin(username)) {
            throw new IllegalArgumentException("cannot delete admin: " + username);
        }
        store.deleteUser(username);
        return RestResultUtils.success("delete user ok!");
    }

    @PutMapping
    @Secured(resource = UserStore.UPDATE_PASSWORD_RESOURCE, action = ActionTypes.WRITE)
    public RestResult<String> updateUser(@RequestParam("username") String username, @RequestParam("newPassword") String newPassword,
            HttpServletRequest request) throws AccessException {
        Object caller = request.getAttribute(RequestUtil.NACOS_USER_KEY);
        if (caller instanceof AuthUser) { // null when auth is off: anyone may, as in Nacos
            AuthUser user = (AuthUser) caller;
            if (!user.isGlobalAdmin() && !username.equals(user.getUserName())) {
                throw new AccessException("authorization failed!");
            }
        }
        if (store.findUser(username) == null) {
            throw new IllegalArgumentException("user " + username + " not exist!");
        }
        store.updatePassword(username, newPassword);
        return RestResultUtils.success("update user ok!");
    }

    @GetMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "users", action = ActionTypes.READ)
    public Page<User> getUsers(@RequestParam("pageNo") int pageNo, @RequestParam("pageSize") int pageSize) {
        return store.usersPage(pageNo, pageSize);
    }

    @GetMapping("/search")
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "users", action = ActionTypes.WRITE)
    public List<String> searchUsers(@RequestParam("username") String username) {
        return store.usersLike(username);
    }
}
